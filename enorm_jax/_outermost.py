"""The outermost rule of `enorm`, checked: its updates must reach the params unchanged.

`enorm` returns ``balanced - params``. A transformation chained after it (a
scale, a clip, a learning rate) changes that difference, and the params that
result are no longer a rescaling of the network: the function changes with no
error. `enorm` therefore keeps a fingerprint of the params it returned (per
rescaled leaf: the sum and the sum of squares, in float32) and compares the
params of the next update with it (`changed_leaves`). The updates depend on the
comparison, so every read of the old params precedes the in-place write of
donated params, with no copy.

Two ways to report a mismatch. ``'record'`` adds no control flow: the updates
become NaN (so the loss shows it at the next step) and the state keeps which
leaves differed, for `raise_changed` to name on the host. ``True`` also raises
from inside jit at the failing step, through a `jax.pure_callback` under a
`lax.cond` that runs it only on a mismatch; a pure callback leaves the program
without side effects, so jit keeps its fast dispatch path. The conditional has a
cost of its own on XLA:CPU, even when never taken (`benchmarks.lm_step`). Under
SPMD the callback runs on one device and its boolean result is shared by an
all-reduce inside the error branch, which runs only when the check fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from enorm_jax import _paths


def fingerprint(params: Any, paths: Sequence[str]) -> jax.Array:
  """``[sum, sum of squares]`` in float32 of each leaf in ``paths``: shape (len(paths), 2)."""
  if not paths:
    return jnp.zeros((0, 2), jnp.float32)
  leaves = _paths.leaves_by_path(params)
  xs = [jnp.ravel(leaves[path]).astype(jnp.float32) for path in paths]
  # Reductions, accurate to ~1e-7 in any order, so that a state saved on one mesh or
  # backend passes the check on another. Not `jnp.vdot`: a long float32 dot on
  # XLA:CPU accumulates serially (relative error 4e-3 for 4M elements, and another
  # once sharded), far above the check's tolerance; states that hold such
  # fingerprints fail the check on large leaves.
  return jnp.stack([jnp.stack([jnp.sum(x), jnp.sum(x * x)]) for x in xs])


def raise_changed(changed, paths):
  """Raises naming the changed leaves, if any; ``changed`` (host values) may have leading
  batch axes (`vmap`)."""
  changed = np.asarray(changed)
  bad = [p for p, flag in zip(paths, changed.reshape(-1, len(paths)).any(0)) if flag]
  if bad:
    raise ValueError(
        f"enorm: the params of this update are not those its previous update produced "
        f"({_paths.describe_paths(bad, 4)} differ). enorm must be the outermost "
        "transformation and its updates applied unchanged, params = "
        "optax.apply_updates(params, updates): a transformation chained after enorm "
        "(a scale, clipping, a learning rate) changes `balanced - params` and with it "
        "the network's function. Put it inside enorm(inner, ...). If you change the "
        "params between steps on purpose, pass check_applied=False. If you restored the "
        "params and the optimizer state from checkpoints of different steps, restore "
        "both from the same step.")
  return np.ones(changed.shape[:-1], np.bool_)


def changed_leaves(expected: jax.Array, params: Any, paths: Sequence[str],
                   active: jax.Array) -> jax.Array:
  """Per leaf of ``paths``, whether ``params`` differ from the fingerprint ``expected``
  (the one the previous update stored) beyond rounding, where ``active``."""
  if not paths:
    return jnp.zeros((0,), jnp.bool_)
  leaves = _paths.leaves_by_path(params)
  # Per-leaf constants, vectorized so that the check is a handful of ops, not one per leaf.
  tol = np.array([max(1e-5, 4 * float(jnp.finfo(jnp.result_type(leaves[p])).eps))
                  for p in paths], np.float32)
  size = np.array([np.size(leaves[p]) for p in paths], np.float32)
  got = fingerprint(params, paths)
  scale_sq = jnp.maximum(expected[:, 1], got[:, 1])
  diff = jnp.abs(got - expected)
  # |sum x| <= sqrt(size * sum x^2): the sum's tolerance scales with that bound.
  sum_ok = diff[:, 0] <= tol * jnp.sqrt(size * scale_sq) + 1e-30
  sq_ok = diff[:, 1] <= 2 * tol * scale_sq + 1e-30
  finite = jnp.all(jnp.isfinite(expected) & jnp.isfinite(got), axis=1)  # NaN: not ours
  return finite & ~(sum_ok & sq_ok) & active


def raise_in_step(changed: jax.Array, paths: Sequence[str]) -> jax.Array:
  """Raises (at run time, from inside jit) if any of ``changed`` is set; else True."""
  if not paths:
    return jnp.bool_(True)
  return lax.cond(
      jnp.any(changed),
      lambda c: jax.pure_callback(lambda c: raise_changed(c, paths),
                                  jax.ShapeDtypeStruct((), jnp.bool_), c,
                                  vmap_method="broadcast_all"),
      lambda c: jnp.bool_(True), changed)
