"""Exact ENorm: block coordinate descent over a `RescalingGraph`.

Everything here is pure and jit-able. A call works on *lazy* scales: each group
keeps a vector ``t`` of accumulated factors, a parameter's current value is its
input value times the factors of every entry that touches it, and each leaf is
written once, at the end. Norms come from per-leaf sums of |w|^p taken once
per call (a conv kernel's taps summed, so its cycles read a 9x smaller array;
with several cycles, |w|^p of dense kernels too), contracted with the other
entries' factors^p by matrix-vector products. The Python loops run over groups
and entries at trace time, never over units.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from enorm_jax import _norms, _paths
from enorm_jax._plan import Plan, Scales, abs_pow, unit_reduce
from enorm_jax.graph import RescalingGraph, require_graph

_SCHEDULES = ("sequential", "parallel")


def check_hyperparams(p=2.0, c=1.0, cycles=1, schedule="sequential") -> None:
  """Raises `ValueError` for invalid ENorm settings (concrete values only)."""
  if isinstance(p, numbers.Real) and not (p > 0 and math.isfinite(p)):
    raise ValueError(f"p must be a finite number > 0, got p={p!r}.")
  if isinstance(c, numbers.Real) and not (c > 0 and math.isfinite(c)):
    raise ValueError(f"c must be a finite number > 0 (use c=1 for plain ENorm), got c={c!r}.")
  if isinstance(cycles, jax.Array) and not isinstance(cycles, jax.core.Tracer):
    cycles = int(cycles) if cycles.ndim == 0 and jnp.issubdtype(cycles.dtype, jnp.integer) \
        else cycles
  if isinstance(cycles, jax.core.Tracer):
    if cycles.ndim != 0 or not jnp.issubdtype(cycles.dtype, jnp.integer):
      raise ValueError(f"a traced cycles must be an integer scalar, got {cycles.aval}.")
  elif not isinstance(cycles, numbers.Integral) or cycles < 1:
    raise ValueError(f"cycles must be an int >= 1, got cycles={cycles!r}.")
  if schedule not in _SCHEDULES:
    raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}.")


def _factor(log_in: jax.Array, log_out: jax.Array, p, c) -> jax.Array:
  """d = sqrt(R / L) / sqrt(c) from log L^p and log R^p (1 where not finite)."""
  log_d = 0.5 * (log_out - log_in) / p - 0.5 * jnp.log(jnp.asarray(c, jnp.float32))
  d = jnp.exp(jnp.where(jnp.isfinite(log_d), log_d, 0.0))
  return jnp.where(jnp.isfinite(d) & (d > 0), d, 1.0)


def _trusted_factor(s_in: jax.Array, s_out: jax.Array, p, c) -> jax.Array:
  """`_factor` from sums inside the float32-safe range (`_norms.SAFE_MIN`,
  `SAFE_MAX`; elsewhere the result is discarded). For p = 1 and 2 by square
  roots, which XLA:CPU computes faster than a log and an exp (one cycle 1-3 %
  faster side by side on the tiny-Shakespeare decoders); each sum's root first,
  so that their ratio cannot overflow."""
  if not (isinstance(p, numbers.Real) and p in (1, 2)):
    return _factor(jnp.log(s_in), jnp.log(s_out), p, c)
  d = jnp.sqrt(s_out) / jnp.sqrt(s_in)
  d = jnp.sqrt(d) if p == 2 else d
  return d if isinstance(c, numbers.Real) and c == 1 else d * lax.rsqrt(
      jnp.asarray(c, jnp.float32))


def _updated(t: Scales, factors: dict[int, jax.Array]) -> Scales:
  """``t`` with the groups in ``factors`` multiplied by their new factors."""
  return tuple(t[i] * factors[i] if i in factors else t[i] for i in range(len(t)))


@dataclasses.dataclass(frozen=True)
class _Cycle:
  """One ENorm cycle over fixed inputs: ``cycle(t)`` returns the scales after it.

  ``t`` holds each group's accumulated factors; a parameter's current value is
  its float32 input in ``work`` times the factors of its entries.
  """

  plan: Plan
  work: dict[str, jax.Array]  # float32 inputs of the rescaled leaves
  stats: dict[str, jax.Array]  # per-leaf sums of |w|^p (`_norms.leaf_stats`)
  phases: tuple[tuple[int, ...], ...]  # groups updated together
  p: Any
  c: Any
  include_biases: bool

  def __call__(self, t: Scales) -> Scales:
    # All sums in the float32-safe range (the usual case): one check per cycle.
    # Otherwise the cycle is redone with per-group log-space fallbacks.
    fast, trusted = self._fast(t)
    return lax.cond(trusted, lambda: fast, lambda: self._careful(t))

  def _fast(self, t: Scales) -> tuple[Scales, jax.Array]:
    sums = []
    for phase in self.phases:
      factors = {}
      for gi in phase:
        if gi in self.plan.recurrent:
          factors[gi] = self._recurrent_factor(gi, t)
          continue
        s_in, s_out = self._sums(gi, t)
        factors[gi] = _trusted_factor(s_in, s_out, self.p, self.c)
        sums += [s_in, s_out]
      t = _updated(t, factors)
    return t, _norms.trusted(sums)

  def _careful(self, t: Scales) -> Scales:
    for phase in self.phases:
      t = _updated(t, {gi: self._recurrent_factor(gi, t) if gi in self.plan.recurrent
                       else self._careful_factor(gi, t) for gi in phase})
    return t

  def _sums(self, gi: int, t: Scales) -> tuple[jax.Array, jax.Array]:
    """Per-unit sums of |w|^p over group ``gi``'s incoming and outgoing weights."""
    size = self.plan.groups[gi].size

    def unit_sums(r):
      if r.path in self.stats:
        return _norms.weighted_unit_sums(self.plan, r, self.stats[r.path], t, self.p, size)
      return unit_reduce(abs_pow(self._current(r.path, t, r.view), self.p), r, size)

    incoming, outgoing = _norms.norm_entries(self.plan.groups[gi], self.include_biases)
    return sum(unit_sums(r) for r in incoming), sum(unit_sums(r) for r in outgoing)

  def _recurrent_factor(self, gi: int, t: Scales) -> jax.Array:
    """Factors of a group with a recurrent kernel ``w`` (``w[i, k]`` times
    ``d[k] / d[i]``): the units share ``w``'s off-diagonal elements, so they are
    not independent coordinates. Each unit in turn takes the exact minimiser
    with every other unit fixed (its norms without ``w``'s diagonal, which no
    factor changes); ``|w|^p`` is updated along one row and column per unit, and
    each unit's sums are added afresh from non-negative terms."""
    g, path = self.plan.groups[gi], self.plan.recurrent[gi]
    size = g.size
    incoming, outgoing = _norms.norm_entries(g, self.include_biases)

    def own(entries):  # the unit's sums over every entry but the recurrent kernel
      return sum((unit_reduce(abs_pow(self._current(r.path, t, r.view), self.p), r, size)
                  for r in entries if r.path != path),
                 jnp.zeros((size,), jnp.float32))

    off_diagonal = 1.0 - jnp.eye(size, dtype=jnp.float32)
    shared = abs_pow(self._current(path, t), self.p) * off_diagonal  # [reader i, unit k]

    def unit(j, carry):
      own_in, own_out, shared, d = carry
      s_in = own_in[j] + jnp.sum(shared[:, j])
      s_out = own_out[j] + jnp.sum(shared[j, :])
      dj = _factor(jnp.log(s_in), jnp.log(s_out), self.p, self.c)
      dp = abs_pow(dj, self.p)
      shared = shared.at[:, j].multiply(dp).at[j, :].divide(dp)
      return (own_in.at[j].multiply(dp), own_out.at[j].divide(dp), shared, d.at[j].set(dj))

    carry = (own(incoming), own(outgoing), shared, jnp.ones((size,), jnp.float32))
    return lax.fori_loop(0, size, unit, carry)[3]

  def _current(self, path: str, t: Scales, view: tuple[int, ...] | None = None) -> jax.Array:
    """The leaf's current value (in ``view``, a reshape of it, where given).

    Scaled in the view it is summed in: scaled in its own shape and then
    reshaped, two leaves of one shape (a key and a value kernel) share one
    broadcast of their norm group's factors, which XLA then writes to memory
    (4-6 % of a Llama-style cycle at width 128, 4 % at 512;
    `benchmarks/RESULTS.md`)."""
    x = self.work[path]
    if view is None or path in self.plan.recurrent.values():
      return self.plan.scale(path, x, t, exact=False).reshape(view or x.shape)
    return self.plan.scale(path, x.reshape(view), t, exact=False)

  def _careful_factor(self, gi: int, t: Scales) -> jax.Array:
    """Group ``gi``'s factor, with its norms in log space if their sums are unsafe."""
    size = self.plan.groups[gi].size
    s_in, s_out = self._sums(gi, t)
    incoming, outgoing = _norms.norm_entries(self.plan.groups[gi], self.include_biases)
    current = lambda path: self._current(path, t)
    log_in, log_out = lax.cond(
        _norms.trusted([s_in, s_out]),
        lambda: (jnp.log(s_in), jnp.log(s_out)),
        lambda: (_norms.log_unit_sums(current, incoming, size, self.p),
                 _norms.log_unit_sums(current, outgoing, size, self.p)))
    return _factor(log_in, log_out, self.p, self.c)


def balance(params: Any, graph: RescalingGraph, *, p: float = 2.0, c: float = 1.0,
            cycles: int = 1, include_biases: bool = False,
            schedule: str = "sequential") -> tuple[Any, Scales]:
  """Runs ``cycles`` cycles of exact ENorm block coordinate descent.

  Each group's unit factor is the exact minimiser of the energy with every other
  group fixed, computed on the current weights (already updated by the groups
  before it in the cycle):

      d = sqrt(R / L) / sqrt(c),

  where ``R`` is the l_p norm of the unit's slices over all consumers and ``L``
  over all producers (plus their biases if ``include_biases``). Producers and
  their biases are multiplied by ``d`` and consumers divided by it, so a ReLU
  network computes the same function. A unit whose ``L`` or ``R`` is zero or
  not finite keeps factor 1; finite weights never become NaN or Inf.

  Args:
    params: the parameter pytree the graph's paths point into.
    graph: the `RescalingGraph`.
    p: the norm exponent, > 0.
    c: the asymmetric scaling factor, > 0 (1 for plain ENorm; the paper also
      uses 1.2).
    cycles: number of full passes over the groups: a Python int, or a traced
      integer scalar (one compilation for every count; values < 1 run none).
    include_biases: whether producers' biases count in ``L``. Biases are always
      rescaled with their unit.
    schedule: ``'sequential'`` updates groups in graph order (the paper's
      Algorithm 1). ``'parallel'`` updates the conflict-free phases of
      ``graph.phases`` at once: also exact block coordinate descent, with the
      same minimiser, in fewer sequential steps (2 for a chain).

  Returns:
    ``(new_params, scales)``: ``scales[i]`` holds group ``i``'s total factors
    applied by this call (float32, one per unit). Dtypes are preserved; norms
    are accumulated in float32.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 8)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2', 'layers_4'])
    >>> balanced, scales = jax.jit(enorm_jax.balance, static_argnames=('graph', 'cycles'))(
    ...     params, graph=graph, cycles=10)
    >>> bool(enorm_jax.energy(balanced, graph) <= enorm_jax.energy(params, graph))
    True

  References:
    Stock, Graham, Gribonval and Jégou, `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, Algorithm 1 and eq. (5).
  """
  check_hyperparams(p, c, cycles, schedule)
  paths, leaves, treedef = _paths.flatten_with_paths(params)
  plan = Plan.build(graph, dict(zip(paths, leaves)))
  if plan.recurrent and not (isinstance(c, numbers.Real) and c == 1):
    raise ValueError(f"c={c!r} with a recurrent kernel ({next(iter(plan.recurrent.values()))!r} "
                     "on both sides of its group): its units have no layer height for c "
                     "to weigh, so use c=1.")
  # Offset gains are balanced as the gains they act as (value + shift).
  work = {path: jnp.asarray(leaf).astype(jnp.float32) + plan.shifts.get(path, 0.0)
          for path, leaf in zip(paths, leaves) if path in plan.by_leaf}
  single_cycle = isinstance(cycles, int) and cycles == 1
  phases = (graph.phases if schedule == "parallel"
            else tuple((i,) for i in range(len(plan.groups))))
  cycle = _Cycle(plan, work, _norms.leaf_stats(plan, work, p, dense=not single_cycle), phases,
                 p, c, include_biases)
  t0 = tuple(jnp.ones((g.size,), jnp.float32) for g in plan.groups)
  scales = cycle(t0) if single_cycle else lax.fori_loop(0, cycles, lambda _, t: cycle(t), t0)
  new_leaves = [
      (plan.scale(path, work[path], scales) - plan.shifts.get(path, 0.0)).astype(leaf.dtype)
      if path in work else leaf for path, leaf in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new_leaves), scales


# How a params-shaped buffer transforms when its parameter is multiplied by s:
# it is multiplied by s**power. Optimizer-state roles and `rescale` powers alike.
FIRST_MOMENT, SECOND_MOMENT, PARAM_COPY = -1, -2, 1


def rescale(tree: Any, scales: Sequence[jax.Array], graph: RescalingGraph, *,
            power: int = PARAM_COPY) -> Any:
  """Applies given per-group ``scales`` to a params-shaped tree.

  A buffer on a parameter that was multiplied by ``s`` transforms as
  ``s**power``: ``PARAM_COPY`` (+1) rescales parameters exactly as `balance`
  does (and EMA or slow-weight copies), ``FIRST_MOMENT`` (-1) gradients and
  first moments, ``SECOND_MOMENT`` (-2) second moments. Leaves outside the
  graph are returned untouched; dtypes are preserved; divisions are correctly
  rounded.

  Args:
    tree: a pytree with the params' structure (params, gradients, a moment).
    scales: one float array of factors per group, as returned by `balance`.
    graph: the `RescalingGraph` the scales belong to.
    power: ``PARAM_COPY``, ``FIRST_MOMENT``, ``SECOND_MOMENT`` or another int.

  Returns:
    The rescaled tree.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2'])
    >>> balanced, scales = enorm_jax.balance(params, graph, cycles=5)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> at_balanced = enorm_jax.rescale(grads, scales, graph, power=enorm_jax.FIRST_MOMENT)
    >>> bool(jnp.allclose(at_balanced['layers_0']['kernel'], 1 / scales[0]))
    True

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, eq. (10).
  """
  return rescale_tree(tree, scales, graph, power=power, exact=True)


def rescale_tree(tree, scales, graph, *, power=1, signs=(1, -1), exact=True):
  """`rescale`, with ``signs`` selecting the multiplying side (+1: producers,
  biases, carried) and/or the dividing side (-1: consumers), and ``exact=False``
  dividing the fast way (for differentiated uses)."""
  if not isinstance(power, numbers.Integral):
    raise TypeError(f"power must be an int, got {power!r}.")
  paths, leaves, treedef = _paths.flatten_with_paths(tree)
  plan = Plan.build(graph, dict(zip(paths, leaves)))
  t = plan.check_scales(scales)
  new_leaves = [
      plan.scale(path, jnp.asarray(leaf).astype(jnp.float32), t, power, signs,
                 exact=exact, shifted=power == PARAM_COPY).astype(leaf.dtype)
      if path in plan.by_leaf else leaf for path, leaf in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def energy(params: Any, graph: RescalingGraph, *, p: float = 2.0, c: float = 1.0,
           include_biases: bool = False) -> jax.Array:
  """The ENorm objective that `balance` minimises, as a float32 scalar.

  ``E = sum over leaves of c^(p * h) * sum |w|^p``, over every producer and
  consumer kernel of the graph (and producers' biases if ``include_biases``).
  ``h`` is the leaf's height in ``graph.heights`` (0 for the last layer; a
  group's producers are one above its consumers), so for a chain of q layers
  ``E = sum_k ||c^(q-k) W_k||_p^p``, the paper's eq. (6). With ``c = 1`` it is
  the plain ``sum_k ||W_k||_p^p``. Carried entries (e.g. BatchNorm running
  means) and parameters outside the graph are not counted.

  Args:
    params: the parameter pytree the graph's paths point into.
    graph: the `RescalingGraph`.
    p: the norm exponent, > 0.
    c: the asymmetric scaling factor, > 0.
    include_biases: whether the producers' biases count.

  Returns:
    The energy, a float32 scalar.

  Raises:
    ValueError: if ``c != 1`` and the graph has no consistent heights (e.g. a
      type-C ResNet block, whose skip spans two layers).

  Example:
    >>> import jax.numpy as jnp
    >>> import enorm_jax
    >>> params = {'a': {'kernel': jnp.full((2, 3), 2.0)}, 'b': {'kernel': jnp.ones((3, 1))}}
    >>> graph = enorm_jax.chain_graph(params, ['a', 'b'])
    >>> float(enorm_jax.energy(params, graph))  # 6 * 2**2 + 3 * 1**2
    27.0
    >>> float(enorm_jax.energy(params, graph, c=2.0))  # layer a one level up: c**2 * 24 + 3
    99.0

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, eq. (6).
  """
  check_hyperparams(p, c)
  by_path = _paths.leaves_by_path(params)
  groups = require_graph(graph).resolve(by_path)
  counted = {r.path: r.shift
             for g in groups for r in sum(_norms.norm_entries(g, include_biases), ())}
  plain = isinstance(c, numbers.Real) and c == 1
  heights = None if plain else graph.heights
  if not plain and heights is None:
    raise ValueError("energy with c != 1 needs consistent layer heights, but this graph "
                     "has a group whose producers sit at different depths (e.g. a skip "
                     "connection). Use c=1.")
  total = jnp.zeros((), jnp.float32)
  for path in sorted(counted):
    gain = jnp.asarray(by_path[path]).astype(jnp.float32) + counted[path]  # offset gains
    term = jnp.sum(abs_pow(gain, p))
    if not plain:
      term = term * jnp.asarray(c, jnp.float32) ** (p * heights[path])
    total = total + term
  return total
