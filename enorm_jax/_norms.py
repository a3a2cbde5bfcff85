"""Per-unit sums of |w|^p for `balance`: lazy scales, leaf statistics, log space.

A parameter's current value is its input times the factors of every entry that
touches it. Sums over a leaf's axes that no entry touches are taken once per
call (`leaf_stats`, e.g. a conv kernel's taps); each cycle then contracts them
with the other entries' factors^p (`weighted_unit_sums`). `log_unit_sums` is the
slow path for sums outside the float32-safe range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from enorm_jax._plan import MAX_SLICES, Plan, Scales, abs_pow, expand, sum_leading, to_units, unit_reduce
from enorm_jax._resolve import ResolvedEntry

# Unit sums of |w|^p inside this range are trusted; outside it (underflow,
# overflow, zeros, non-finite) the group's norms are recomputed in log space.
SAFE_MIN = 1e-30
SAFE_MAX = 1e30
# A leaf's |w|^p is summed once per call over its leading axes that no entry
# touches, when that shrinks it at least this much (e.g. the taps of a conv).
MIN_STAT_REDUCTION = 2


def log_unit_sums(current, entries, size: int, p) -> jax.Array:
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


def leaf_stats(plan: Plan, work: dict, p, dense: bool) -> dict[str, jax.Array]:
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
    if count and taps >= MIN_STAT_REDUCTION:
      stats[path] = sum_leading(abs_pow(work[path].reshape(view), p), count)
    elif dense and len(view) >= 2:
      stats[path] = abs_pow(work[path].reshape(view), p)
  return stats


def weighted_unit_sums(plan: Plan, r: ResolvedEntry, stat: jax.Array, t: Scales, p,
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


def norm_entries(g, include_biases: bool):
  """The entries of ``L`` (incoming) and ``R`` (outgoing) of resolved group ``g``."""
  if include_biases:
    return g.producers + g.biases, g.consumers + g.consumer_biases
  return g.producers, g.consumers


def trusted(sums: Sequence[jax.Array]) -> jax.Array:
  if not sums:
    return jnp.bool_(True)
  s = jnp.concatenate(sums)
  return jnp.all((s >= SAFE_MIN) & (s <= SAFE_MAX))
