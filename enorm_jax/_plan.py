"""The per-leaf plan of a graph's rescaling, and the correctly rounded division.

`Plan` lists, for each parameter leaf, the (group, entry, sign) that touch it;
`Plan.scale` multiplies or divides a leaf by its groups' factors. Division is
correctly rounded (`divide`), so repeated calls do not drift the function.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from enorm_jax.graph import RescalingGraph, require_graph
from enorm_jax._resolve import ResolvedEntry, ResolvedGroup

Scales = tuple[jax.Array, ...]

# Leading axes of at most this many slices are summed by slice additions.
MAX_SLICES = 64


def sum_leading(x: jax.Array, count: int) -> jax.Array:
  """Sums the ``count`` leading axes of ``x`` (at most `MAX_SLICES` elements).

  XLA:CPU reduces leading axes slowly when many minor elements are kept (20x
  an elementwise pass for a 3x3 conv kernel); a tree of slice additions is one
  elementwise pass. The summed axes are kept with size 1.
  """
  kept = x.shape[count:]
  return _add_tree(list(x.reshape((-1,) + kept))).reshape((1,) * count + kept)


def _add_tree(parts: list[jax.Array]) -> jax.Array:
  """The sum of ``parts`` by pairwise additions (XLA fuses them into one pass)."""
  while len(parts) > 1:
    parts = [a + b for a, b in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2:]
  return parts[0]


def abs_pow(x: jax.Array, p) -> jax.Array:
  if isinstance(p, numbers.Real):
    if p == 2:
      return x * x
    if p == 1:
      return jnp.abs(x)
  return jnp.abs(x) ** p


def sum_trailing(x: jax.Array, count: int) -> jax.Array:
  """Sums the ``count`` trailing axes of ``x`` (contiguous in memory) in one reduction.

  With jax 0.10.2, XLA:CPU fuses the operand (e.g. ``w * w``) into this reduction
  but not into a matrix-vector product with ones, which it writes to memory
  first: side by side, one cycle takes 3-28 % less time this way on FC-15,
  CIFAR-NV, ResNet-18C and the tiny-Shakespeare models (`benchmarks/RESULTS.md`).
  """
  return jnp.sum(x, axis=tuple(range(x.ndim - count, x.ndim)))


def unit_reduce(x: jax.Array, r: ResolvedEntry, size: int, op=jnp.sum) -> jax.Array:
  """Reduces ``x`` (in ``r.view`` shape) to one value per unit of the group."""
  others = tuple(a for a in range(len(r.view)) if a not in r.axes)
  leading = next(i for i in range(len(r.view) + 1) if i not in others)
  if op is jnp.sum and 1 < math.prod(r.view[:leading]) <= MAX_SLICES:
    x = sum_leading(x, leading)
  trailing = [a for a in others if a > max(r.axes)]  # the last axes of x
  if op is jnp.sum and math.prod(r.view[a] for a in trailing) > 1:
    x = sum_trailing(x, len(trailing))
    others = tuple(a for a in others if a not in trailing)
    if any(x.shape[a] > 1 for a in others):
      x = _apart(x)
  if op is jnp.sum and len(runs := _summed_runs(x.shape, others)) > 1:
    x, others = _sum_run(x, others, max(runs, key=lambda run: math.prod(x.shape[a] for a in run)))
  return to_units(op(x, axis=others) if others else x, r, size)


def _summed_runs(shape: tuple[int, ...], summed: tuple[int, ...]) -> list[list[int]]:
  """The runs of adjacent ``summed`` axes (each ``[first, ..., last]``) that hold
  more than one element: those that a unit axis separates."""
  runs = []
  for a in (a for a in summed if shape[a] > 1):
    if runs and all(b in summed for b in range(runs[-1][-1] + 1, a)):
      runs[-1].append(a)
    else:
      runs.append([a])
  return runs


def _apart(x: jax.Array) -> jax.Array:
  """``x``, which XLA may not sum in one reduction with the sums that made it.

  Summed axes on both sides of a unit axis (a grouped query kernel's input,
  heads per K/V head and rotary halves; an output kernel's heads per K/V head
  and output) summed in one reduction took 1.4-2.4x longer on XLA:CPU than a
  reduction over one run of axes followed by the rest on its (smaller) result,
  and the Llama-style cycle 4-6 % longer (`benchmarks/RESULTS.md`).
  """
  return lax.optimization_barrier(x)


def _sum_run(x: jax.Array, axes: tuple[int, ...], run: list[int]
             ) -> tuple[jax.Array, tuple[int, ...]]:
  """Sums ``x`` over the summed axes ``run[0]`` to ``run[-1]`` as one axis of a
  3-D view; returns that partial sum and the rest of ``axes``, renumbered."""
  first, last = run[0], run[-1]
  kept = x.shape[:first] + x.shape[last + 1:]
  x = jnp.sum(x.reshape(math.prod(x.shape[:first]), math.prod(x.shape[first:last + 1]),
                        math.prod(x.shape[last + 1:])), axis=1)
  return (_apart(x).reshape(kept),
          tuple(a - (last - first + 1) * (a > last) for a in axes if not first <= a <= last))


def to_units(s: jax.Array, r: ResolvedEntry, size: int) -> jax.Array:
  """Per-unit vector from ``s``, an array over ``r``'s axes in ascending order."""
  ascending = sorted(r.axes)
  if list(r.axes) != ascending:
    s = jnp.transpose(s, [ascending.index(a) for a in r.axes])
  s = s.reshape(-1)
  if r.offset or r.extent != size:
    s = s[r.offset:r.offset + size]
  return s


def expand(t: jax.Array, r: ResolvedEntry, size: int) -> jax.Array:
  """Turns per-unit factors into a multiplier that broadcasts against ``r.view``."""
  if r.offset or r.extent != size:
    t = jnp.pad(t, (r.offset, r.extent - r.offset - size), constant_values=1)
  m = t.reshape([r.view[a] for a in r.axes])
  ascending = sorted(r.axes)
  if list(r.axes) != ascending:
    m = jnp.transpose(m, [r.axes.index(a) for a in ascending])
  return m.reshape([r.view[a] if a in r.axes else 1 for a in range(len(r.view))])


def _reshape_runs(view: tuple[int, ...], shape: tuple[int, ...]):
  """The runs of a reshape from ``view`` to ``shape``: (view axes, shape axes) pairs
  whose sizes have equal products, in order; trailing size-1 axes join the last run."""
  runs, i, j = [], 0, 0
  while i < len(view) and j < len(shape):
    a, b, pa, pb = [i], [j], view[i], shape[j]
    i, j = i + 1, j + 1
    while pa != pb:
      if pa < pb:
        a.append(i)
        pa, i = pa * view[i], i + 1
      else:
        b.append(j)
        pb, j = pb * shape[j], j + 1
    runs.append((a, b))
  runs[-1][0].extend(range(i, len(view)))
  runs[-1][1].extend(range(j, len(shape)))
  return runs


def fit(m: jax.Array, r: ResolvedEntry, shape: tuple[int, ...] | None = None) -> jax.Array:
  """``m`` (which broadcasts against ``r.view``) as a multiplier of ``shape``, a
  reshape of the parameter (its own shape ``r.shape`` by default): broadcast over
  the runs of the reshape that hold a unit axis, size 1 elsewhere.

  A leaf scaled in its own shape is never reshaped, so XLA writes it in place (a
  reshaped leaf is copied into its donated buffer). Norms scale a leaf in the
  view they sum it in, so two leaves of one shape scaled by one group get
  different broadcasts, which XLA fuses into each sum instead of writing the
  one it would share to memory.
  """
  shape = r.shape if shape is None else tuple(shape)
  if r.view == shape or 0 in shape:
    return m.reshape([1] * (len(shape) - m.ndim) + list(m.shape))
  full, target = list(m.shape), []
  for a, b in _reshape_runs(r.view, shape):
    if any(m.shape[k] > 1 for k in a):
      full[a[0]:a[-1] + 1] = r.view[a[0]:a[-1] + 1]
      target += [shape[k] for k in b]
    else:
      target += [1] * len(b)
  return jnp.broadcast_to(m, full).reshape(target)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Veltkamp split of float32 ``a`` into two halves whose products are exact."""
  c = lax.optimization_barrier(a * 4097.0)  # barriers keep XLA from simplifying
  hi = c - lax.optimization_barrier(c - a)
  return hi, a - hi


def _inverse_parts(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(down, corr)`` with ``x * down + x * corr`` equal to ``x / t`` correctly rounded.

  XLA divides by multiplying with a rounded reciprocal. For ``t`` a few ulps
  below 1 that reciprocal is biased by +2^-24, so balancing a converged network
  call after call drifts its function (1e-4 after 300 calls of a 20-layer
  chain). ``corr = (1 - t * down) / t``, with ``t * down`` computed exactly
  (Dekker's product), restores correct rounding on the unit vectors; each
  weight then costs one multiply-add more. ``down`` is then moved one ulp
  towards zero and the difference added to ``corr``, so that both have the
  sign of ``1 / t`` and are nonzero: an infinite weight stays infinite (never
  ``inf * 0``) without a per-weight test. Units with ``|1 / t| < 2^-100`` or
  not finite keep the plain split.
  """
  down = 1.0 / t
  p = t * down
  t_hi, t_lo = _split(t)
  d_hi, d_lo = _split(down)
  err = ((t_hi * d_hi - p) + t_hi * d_lo + t_lo * d_hi) + t_lo * d_lo
  corr = ((1.0 - p) - err) * down
  corr = jnp.where(jnp.isfinite(corr), corr, 0.0)
  movable = jnp.isfinite(down) & (jnp.abs(down) >= 2.0 ** -100)
  lower = jnp.nextafter(down, jnp.zeros_like(down))
  return _per_unit(jnp.where(movable, lower, down),
                   jnp.where(movable, corr + (down - lower), corr), t=t)


def _per_unit(*parts: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
  """``parts`` unchanged, each divided by an exact 1 that XLA cannot fold.

  XLA:CPU copies cheap arithmetic on a factor vector into every loop that
  broadcasts it to a weight, but not a division (an op it counts as expensive
  and does not repeat per element): so the ~40 operations of
  `_inverse_parts` run once per unit instead of once per weight (the slowest
  kernels of a Llama-style cycle; `benchmarks/RESULTS.md`). ``0 * t`` is a
  signed zero for finite ``t``, so ``one`` is exactly 1 for every ``t``. The
  parts are stacked and divided together, so that one program computes what
  they share (XLA recomputed it in one program per part).
  """
  one = 1.0 + jnp.where(jnp.isfinite(t), 0.0 * t, 0.0)
  return tuple(jnp.stack(parts) / one)


@jax.jit  # so that eager calls get the fused multiply-add too (inlined under jit)
def divide(x: jax.Array, t: jax.Array) -> jax.Array:
  """``x / t``, correctly rounded where XLA contracts the sum into one fused
  multiply-add (XLA:CPU at its default optimization level; not at level 0)."""
  down, corr = _inverse_parts(t)
  return x * down + x * corr


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-leaf list of (group index, entry, sign): sign +1 multiplies, -1 divides."""

  groups: tuple[ResolvedGroup, ...]
  by_leaf: dict[str, tuple[tuple[int, ResolvedEntry, int], ...]]
  # Group index -> its recurrent kernel: a square leaf whose columns are the group's
  # producers and rows its consumers (w[i, k] times d[k] / d[i]; the diagonal stays).
  recurrent: dict[int, str] = dataclasses.field(default_factory=dict)
  # Path -> shift of an offset gain (the parameter acts as value + shift).
  shifts: dict[str, float] = dataclasses.field(default_factory=dict)

  def shape_of(self, path: str) -> tuple[int, ...]:
    """The shape of the parameter at ``path`` (which must be in ``by_leaf``)."""
    return self.by_leaf[path][0][1].shape

  @classmethod
  def build(cls, graph: RescalingGraph, leaves: dict[str, Any]) -> Plan:
    groups = require_graph(graph).resolve(leaves)
    by_leaf: dict[str, list] = {}
    for gi, g in enumerate(groups):
      for r in g.multiplied:
        by_leaf.setdefault(r.path, []).append((gi, r, +1))
      for r in g.divided:
        by_leaf.setdefault(r.path, []).append((gi, r, -1))
    recurrent = {}
    for gi, g in enumerate(groups):
      shared = {r.path for r in g.producers} & {r.path for r in g.consumers}
      for path in sorted(p for p in shared if _overlap(g, p)):
        if gi in recurrent:
          raise ValueError(f"Group {gi} has two recurrent kernels ({recurrent[gi]!r}, "
                           f"{path!r}); at most one parameter may be on both sides.")
        _check_recurrent(g, path)
        recurrent[gi] = path
    shifts = {}
    for path, entries in by_leaf.items():
      values = {r.shift for _, r, _ in entries}
      if len(values) > 1:
        raise ValueError(f"Parameter {path!r} has entries with different shifts "
                         f"{sorted(values)}; give every entry of it the same Entry.shift.")
      if values != {0.0}:
        shifts[path] = values.pop()
    return cls(groups, {k: tuple(v) for k, v in by_leaf.items()}, recurrent, shifts)

  def scale(self, path: str, x: jax.Array, t: Scales, power: int = 1,
            signs: tuple[int, ...] = (1, -1), exact: bool = True,
            shifted: bool = False) -> jax.Array:
    """``x`` times the factor of every entry on ``path``, raised to ``power``.

    ``x`` has the parameter's shape or, except for a recurrent kernel, any
    reshape of it (e.g. an entry's view). With ``exact`` (for values that are
    written back), dividing (exponent -1) is correctly rounded (`divide`); norms
    use XLA's faster division.
    ``signs`` selects multiplying (+1) and/or dividing (-1) entries. With
    ``shifted``, ``x`` holds parameter values of an offset gain: the gain
    ``x + shift`` is scaled, then shifted back.
    """
    shape, given = x.shape, x
    shift = self.shifts.get(path, 0.0) if shifted else 0.0
    if shift:
      x = x + shift
    for gi, r, sign in self.by_leaf.get(path, ()):
      if sign not in signs:
        continue
      exponent = sign * power
      if exponent == 0:
        continue
      m = fit(expand(t[gi], r, self.groups[gi].size), r, shape)
      if exponent == 1:
        x = x * m
      elif exponent == -1:
        x = divide(x, m) if exact else x / m
      else:
        x = x * m ** exponent
    if shift:
      x = x - shift
    if path in self.recurrent.values() and 1 in signs and -1 in signs:
      if shape != self.shape_of(path):
        raise ValueError(f"The recurrent kernel {path!r} is scaled in its own shape "
                         f"{self.shape_of(path)}, not {shape}.")
      x = jnp.where(jnp.eye(shape[0], dtype=bool), given, x)  # d[k] / d[k] on the diagonal
    return x

  def check_scales(self, scales: Sequence[jax.Array]) -> Scales:
    if len(scales) != len(self.groups):
      raise ValueError(f"scales has {len(scales)} entries but the graph has "
                       f"{len(self.groups)} groups; pass the scales returned by balance "
                       "for this graph.")
    for i, (s, g) in enumerate(zip(scales, self.groups)):
      if tuple(jnp.shape(s)) != (g.size,):
        raise ValueError(f"scales[{i}] has shape {jnp.shape(s)}, expected ({g.size},).")
    return tuple(jnp.asarray(s, jnp.float32) for s in scales)


def _covered(r: ResolvedEntry, size: int) -> np.ndarray:
  """The elements of ``r``'s parameter that hold one of the group's units."""
  position = np.zeros(r.view, np.int64)
  stride = 1
  for a in reversed(r.axes):  # the combined unit axis, row-major over r.axes
    shape = [1] * len(r.view)
    shape[a] = r.view[a]
    position = position + np.arange(r.view[a]).reshape(shape) * stride
    stride *= r.view[a]
  return ((position >= r.offset) & (position < r.offset + size)).reshape(r.shape)


def _overlap(g: ResolvedGroup, path: str) -> bool:
  """Whether an element of ``path`` is both a producer and a consumer in ``g`` (a
  recurrent kernel; a kernel whose one slice produces and another consumes, as
  layers stacked in one leaf, is not)."""
  mask = lambda entries: np.logical_or.reduce(
      [_covered(r, g.size) for r in entries if r.path == path])
  return bool((mask(g.producers) & mask(g.consumers)).any())


def _check_recurrent(g: ResolvedGroup, path: str) -> None:
  """A parameter on both sides of a group must be a recurrent kernel: square, its
  columns the units (producers) and its rows the same units (consumers)."""
  prod = [r for r in g.producers if r.path == path]
  cons = [r for r in g.consumers if r.path == path]
  ok = (len(prod) == len(cons) == 1 and prod[0].shape == (g.size, g.size)
        and prod[0].view == prod[0].shape and cons[0].view == cons[0].shape
        and prod[0].axes == (1,) and cons[0].axes == (0,)
        and prod[0].offset == cons[0].offset == 0)
  if not ok:
    raise ValueError(
        f"Parameter {path!r} is both a producer and a consumer of one group of {g.size} "
        "units. That is supported for a recurrent kernel only: shape (units, units), "
        "Entry(path, 1) among the producers and Entry(path, 0) among the consumers. "
        "Otherwise split the units into groups that do not share it.")
