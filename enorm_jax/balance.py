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

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from enorm_jax import paths as tree_paths
from enorm_jax.graph import RescalingGraph, require_graph
from enorm_jax.resolved import ResolvedEntry
from enorm_jax.plan import (MAX_SLICES, Plan, Scales, abs_pow, expand, flatten_with_paths, sum_leading,
                            to_units, unit_reduce)

# Unit sums of |w|^p inside this range are trusted; outside it (underflow,
# overflow, zeros, non-finite) the group's norms are recomputed in log space.
_SAFE_MIN = 1e-30
_SAFE_MAX = 1e30
_SCHEDULES = ("sequential", "parallel")
# A leaf's |w|^p is summed once per call over its leading axes that no entry
# touches, when that shrinks it at least this much (e.g. the taps of a conv).
_MIN_STAT_REDUCTION = 2


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


def _log_unit_sums(plan: Plan, current, entries, size: int, p) -> jax.Array:
  """log(sum |w|^p) per unit, safe from underflow and overflow (max-rescaled)."""
  total = None
  for r in entries:
    a = jnp.abs(current(r.path).reshape(r.view))
    m = unit_reduce(a, r, size, op=jnp.max)
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
    s = unit_reduce(abs_pow(a / expand(safe, r, size), p), r, size)
    log_sum = jnp.where(m > 0, p * jnp.log(safe) + jnp.log(s), -jnp.inf)
    log_sum = jnp.where(jnp.isfinite(m), log_sum, jnp.where(jnp.isnan(m), jnp.nan, jnp.inf))
    total = log_sum if total is None else jnp.logaddexp(total, log_sum)
  return total


def _leaf_stats(plan: Plan, work: dict, p, dense: bool) -> dict[str, jax.Array]:
  """Per-leaf sums of |w|^p over the axes no entry touches (keepdims, view shape).

  Norms under any scales only need these: a leaf's entries multiply along their
  own axes, so the untouched axes can be summed once, before the cycles. Only
  leading untouched axes with at most `MAX_SLICES` elements are summed (e.g.
  the spatial taps of an HWIO conv kernel). With ``dense`` (for more than one
  cycle), kernels with nothing to sum get |w|^p itself, so that every cycle
  contracts it by matrix-vector products; otherwise they are reduced directly,
  which is cheaper for a single cycle.
  """
  stats = {}
  for path, entries in plan.by_leaf.items():
    views = {r.view for _, r, _ in entries}
    if len(views) != 1:
      continue
    view = views.pop()
    touched = {a for _, r, _ in entries for a in r.axes}
    count = min(touched, default=0)
    taps = math.prod(view[:count])
    if taps > MAX_SLICES:
      continue
    if count and taps >= _MIN_STAT_REDUCTION:
      stats[path] = sum_leading(abs_pow(work[path].reshape(view), p), count)
    elif dense and len(view) >= 2:
      stats[path] = abs_pow(work[path].reshape(view), p)
  return stats


def _weighted_unit_sums(plan: Plan, r: ResolvedEntry, stat: jax.Array, t: Scales, p,
                        size: int) -> jax.Array:
  """Unit sums of ``stat`` (sums of |w|^p) for entry ``r`` under the current scales.

  Each entry of the leaf weights ``stat`` by its factors^p (multiplying) or
  ^-p (dividing). Factors along ``r``'s own axes are applied after the sum and
  factors along disjoint axes are contracted with ``stat`` in one dot_general
  (a matrix-vector product for a kernel), which XLA:CPU runs faster than a
  multiply followed by a reduction.
  """
  weights = []
  for gi, e, sign in plan.by_leaf[r.path]:
    m = expand(t[gi], e, plan.groups[gi].size)
    m = m * m if isinstance(p, numbers.Real) and p == 2 else m ** p
    weights.append((e, m if sign > 0 else 1.0 / m))
  if any(set(e.axes) & set(r.axes) and set(e.axes) != set(r.axes) for e, _ in weights):
    for _, m in weights:  # partly overlapping axes: weight elementwise, then reduce
      stat = stat * m
    return unit_reduce(stat, r, size)
  operands, post = [stat, list(range(stat.ndim))], 1.0
  for e, m in weights:
    if set(e.axes) == set(r.axes):
      post = post * m
    else:
      operands += [m.reshape([e.view[a] for a in sorted(e.axes)]), sorted(e.axes)]
  s = jnp.einsum(*operands, sorted(r.axes), precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return to_units(s * jnp.reshape(post, s.shape), r, size)  # r itself is in weights


def _group_sums(plan: Plan, gi: int, work: dict, stats: dict, t: Scales, p,
                include_biases: bool) -> tuple[jax.Array, jax.Array]:
  """Per-unit sums of |w|^p over group ``gi``'s incoming and outgoing weights."""
  g = plan.groups[gi]

  def unit_sums(r):
    if r.path in stats:
      return _weighted_unit_sums(plan, r, stats[r.path], t, p, g.size)
    current = plan.scale(r.path, work[r.path], t, exact=False)
    return unit_reduce(abs_pow(current.reshape(r.view), p), r, g.size)

  incoming, outgoing = _norm_entries(g, include_biases)
  return sum(unit_sums(r) for r in incoming), sum(unit_sums(r) for r in outgoing)


def _norm_entries(g, include_biases: bool):
  """The entries of ``L`` (incoming) and ``R`` (outgoing) of resolved group ``g``."""
  if include_biases:
    return g.producers + g.biases, g.consumers + g.consumer_biases
  return g.producers, g.consumers


def _factor(log_in: jax.Array, log_out: jax.Array, p, c) -> jax.Array:
  """d = sqrt(R / L) / sqrt(c) from log L^p and log R^p (1 where not finite)."""
  log_d = 0.5 * (log_out - log_in) / p - 0.5 * jnp.log(jnp.asarray(c, jnp.float32))
  d = jnp.exp(jnp.where(jnp.isfinite(log_d), log_d, 0.0))
  return jnp.where(jnp.isfinite(d) & (d > 0), d, 1.0)


def _trusted(sums: Sequence[jax.Array]) -> jax.Array:
  s = jnp.concatenate(sums)
  return jnp.all((s >= _SAFE_MIN) & (s <= _SAFE_MAX))


def _updated(t: Scales, factors: dict[int, jax.Array]) -> Scales:
  """``t`` with the groups in ``factors`` multiplied by their new factors."""
  return tuple(t[i] * factors[i] if i in factors else t[i] for i in range(len(t)))


def _careful_factor(plan: Plan, gi: int, work: dict, stats: dict, t: Scales, p, c,
                    include_biases: bool) -> jax.Array:
  """Group ``gi``'s factor, with its norms in log space if their sums are unsafe."""
  g = plan.groups[gi]
  s_in, s_out = _group_sums(plan, gi, work, stats, t, p, include_biases)

  def current(path):
    return plan.scale(path, work[path], t, exact=False)

  incoming, outgoing = _norm_entries(g, include_biases)
  log_in, log_out = lax.cond(
      _trusted([s_in, s_out]),
      lambda: (jnp.log(s_in), jnp.log(s_out)),
      lambda: (_log_unit_sums(plan, current, incoming, g.size, p),
               _log_unit_sums(plan, current, outgoing, g.size, p)))
  return _factor(log_in, log_out, p, c)


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
  paths, leaves, treedef = flatten_with_paths(params)
  by_path = dict(zip(paths, leaves))
  plan = Plan.build(graph, by_path)
  work = {path: jnp.asarray(by_path[path]).astype(jnp.float32) for path in plan.by_leaf}
  if schedule == "parallel":
    phases = graph.phases
  else:
    phases = tuple((i,) for i in range(len(plan.groups)))

  single_cycle = isinstance(cycles, int) and cycles == 1
  stats = _leaf_stats(plan, work, p, dense=not single_cycle)

  def fast_cycle(t: Scales) -> tuple[Scales, jax.Array]:
    sums = []
    for phase in phases:
      factors = {}
      for gi in phase:
        s_in, s_out = _group_sums(plan, gi, work, stats, t, p, include_biases)
        factors[gi] = _factor(jnp.log(s_in), jnp.log(s_out), p, c)
        sums += [s_in, s_out]
      t = _updated(t, factors)
    return t, _trusted(sums)

  def careful_cycle(t: Scales) -> Scales:
    for phase in phases:
      factors = {gi: _careful_factor(plan, gi, work, stats, t, p, c, include_biases)
                 for gi in phase}
      t = _updated(t, factors)
    return t

  def one_cycle(t: Scales) -> Scales:
    # All sums in the float32-safe range (the usual case): one check per cycle.
    # Otherwise the cycle is redone with per-group log-space fallbacks.
    fast, trusted = fast_cycle(t)
    return lax.cond(trusted, lambda: fast, lambda: careful_cycle(t))

  t0 = tuple(jnp.ones((g.size,), jnp.float32) for g in plan.groups)
  scales = one_cycle(t0) if single_cycle else lax.fori_loop(
      0, cycles, lambda _, t: one_cycle(t), t0)
  new_leaves = [
      plan.scale(path, work[path], scales).astype(leaf.dtype) if path in work else leaf
      for path, leaf in zip(paths, leaves)]
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
  paths, leaves, treedef = flatten_with_paths(tree)
  plan = Plan.build(graph, dict(zip(paths, leaves)))
  t = plan.check_scales(scales)
  new_leaves = [
      plan.scale(path, jnp.asarray(leaf).astype(jnp.float32), t, power, signs,
                 exact=exact).astype(leaf.dtype)
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
  by_path = tree_paths.leaves_by_path(params)
  groups = require_graph(graph).resolve(by_path)
  counted = {r.path for g in groups for r in sum(_norm_entries(g, include_biases), ())}
  plain = isinstance(c, numbers.Real) and c == 1
  heights = None if plain else graph.heights
  if not plain and heights is None:
    raise ValueError("energy with c != 1 needs consistent layer heights, but this graph "
                     "has a group whose producers sit at different depths (e.g. a skip "
                     "connection). Use c=1.")
  total = jnp.zeros((), jnp.float32)
  for path in sorted(counted):
    term = jnp.sum(abs_pow(jnp.asarray(by_path[path]).astype(jnp.float32), p))
    if not plain:
      term = term * jnp.asarray(c, jnp.float32) ** (p * heights[path])
    total = total + term
  return total
