"""The outermost rule of `enorm`, checked: its updates must reach the params unchanged.

`enorm` returns ``balanced - params``. A transformation chained after it (a
scale, a clip, a learning rate) changes that difference, and the params that
result are no longer a rescaling of the network: the function changes with no
error. `enorm` therefore keeps a fingerprint of the params it returned (per
rescaled leaf: the sum and the sum of squares, in float32) and compares the
params of the next update with it. A mismatch raises at run time, from inside
jit, through a callback that only runs on the mismatch branch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from enorm_jax import paths as tree_paths

Fingerprint = Mapping[str, jax.Array]


def fingerprint(params: Any, paths: Collection[str]) -> Fingerprint:
  """``{path: [sum, sum of squares]}`` in float32 for each leaf in ``paths``."""
  leaves = tree_paths.leaves_by_path(params)
  out = {}
  for path in sorted(paths):
    x = jnp.asarray(leaves[path]).astype(jnp.float32)
    out[path] = jnp.stack([jnp.sum(x), jnp.sum(x * x)])
  return out


def _raise_changed(changed, paths):
  bad = [p for p, flag in zip(paths, changed.tolist()) if flag]
  if bad:
    raise ValueError(
        f"enorm: the params of this update are not those its previous update produced "
        f"({tree_paths.describe_paths(bad, 4)} differ). enorm must be the outermost "
        "transformation and its updates applied unchanged, params = "
        "optax.apply_updates(params, updates): a transformation chained after enorm "
        "(a scale, clipping, a learning rate) changes `balanced - params` and with it "
        "the network's function. Put it inside enorm(inner, ...). If you change the "
        "params between steps on purpose, pass check_applied=False.")


def check_unchanged(expected: Fingerprint, params: Any, active: jax.Array) -> None:
  """Raises (at run time) if ``params`` do not match ``expected`` where ``active``."""
  if not expected:
    return
  paths = tuple(sorted(expected))
  leaves = tree_paths.leaves_by_path(params)
  got = fingerprint(params, paths)
  changed = []
  for path in paths:
    leaf = leaves[path]
    tol = max(1e-5, 4 * float(jnp.finfo(jnp.result_type(leaf)).eps))
    want, have = expected[path], got[path]
    scale_sq = jnp.maximum(want[1], have[1])
    # |sum x| <= sqrt(size * sum x^2): the sum's tolerance scales with that bound.
    sum_ok = jnp.abs(have[0] - want[0]) <= tol * jnp.sqrt(jnp.size(leaf) * scale_sq) + 1e-30
    sq_ok = jnp.abs(have[1] - want[1]) <= 2 * tol * scale_sq + 1e-30
    finite = jnp.all(jnp.isfinite(want)) & jnp.all(jnp.isfinite(have))  # NaN: not ours
    changed.append(finite & ~(sum_ok & sq_ok))
  changed = jnp.stack(changed) & active
  lax.cond(jnp.any(changed),
           lambda c: jax.debug.callback(lambda c: _raise_changed(c, paths), c),
           lambda c: None, changed)
