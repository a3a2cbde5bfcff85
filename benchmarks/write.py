r"""Ways to write (and to read) ResNet-18C's weights, against the memory floor.

    python -m benchmarks.write [--quick] [--json PATH]

Every column is a median over jitted, donated calls divided by the floor's
(every weight read and written once), timed in alternation. Each kernel gets
random factor vectors along its input and output axes (0.9-1.1); 1-D leaves
get an output vector.

Writes of the weights times per-unit factors:

* ``exact``: ``enorm_jax.rescale``, the write `balance` does (a correctly
  rounded division along the input axis, a multiplication along the output
  axis);
* ``two_vectors``: ``w * a[out] * b[in, None]``, not correctly rounded;
* ``one_axis``: ``w * a[out]``;
* ``factor_matrix``: ``w * (a / b[:, None])``, one precomputed (in, out)
  matrix: it multiplies by a rounded quotient, which `balance` does not do.

Reads of the 3x3 (and larger) conv kernels to their per-tap sums of w^2:
``taps_slices`` (slice additions, as `balance`), ``taps_reduce`` (a
leading-axis reduction) and ``taps_matvec`` (a matrix-vector product on a
materialized w^2).

Whole cycles (parallel schedule): ``cycle``, and ``cycle_plain_division``,
the same `balance` traced with XLA's own division in place of the correctly rounded one (what the correct rounding
costs; XLA's division is biased for factors just below 1, so repeated calls
drift).
"""

from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import enorm_jax
from benchmarks import _common
from enorm_jax.plan import sum_leading
from enorm_jax.models import ResNet18C


def _has_taps(w) -> bool:
  return w.ndim == 4 and w.shape[0] * w.shape[1] > 1


WRITES = {
    "two_vectors": lambda w, a_in, a_out: w * a_out * a_in[:, None],
    "one_axis": lambda w, a_in, a_out: w * a_out,
    "factor_matrix": lambda w, a_in, a_out: w * (a_out / a_in[:, None]),
}
TAP_SUMS = {
    "taps_slices": lambda w: sum_leading(w * w, 2),
    "taps_reduce": lambda w: jnp.sum((w * w).reshape(-1, *w.shape[2:]), axis=0),
    "taps_matvec": lambda w: jnp.ones(w.shape[0] * w.shape[1], w.dtype)
                             @ (w * w).reshape(w.shape[0] * w.shape[1], -1),
}


@contextlib.contextmanager
def _swapped(name: str, replacement):
  """Replaces ``enorm_jax.plan.<name>`` while a function is traced."""
  module = sys.modules["enorm_jax.plan"]
  original = getattr(module, name)
  setattr(module, name, replacement)
  try:
    yield
  finally:
    setattr(module, name, original)


def _compiled(fn, params):
  return jax.jit(fn, donate_argnums=0).lower(params).compile()


def _factors(params, graph, seed=0):
  """Random per-group scales, and per-leaf (input, output) factor vectors."""
  rng = np.random.default_rng(seed)
  scales = [jnp.asarray(rng.uniform(0.9, 1.1, g.size), jnp.float32) for g in graph.groups]
  vectors = [(jnp.asarray(rng.uniform(0.9, 1.1, w.shape[-2]), jnp.float32) if w.ndim >= 2
              else None, jnp.asarray(rng.uniform(0.9, 1.1, w.shape[-1]), jnp.float32))
             for w in jax.tree.leaves(params)]
  return scales, vectors


def steps(params, graph):
  """name -> (step, state) for `_common.interleaved_ms`."""
  scales, vectors = _factors(params, graph)
  leaves = jax.tree.leaves(params)
  copy = lambda: jax.tree.map(jnp.copy, params)
  write = lambda p: enorm_jax.rescale(p, scales, graph)
  out = {"floor": (jax.jit(lambda p: jax.tree.map(lambda w: w * 1.0001, p), donate_argnums=0),
                   copy()),
         "exact": (_compiled(write, params), copy())}
  for name, fn in WRITES.items():
    by_leaf = lambda ls, fn=fn: [w * b if a is None else fn(w, a, b)
                                 for w, (a, b) in zip(ls, vectors)]
    out[name] = (jax.jit(by_leaf, donate_argnums=0), [jnp.copy(w) for w in leaves])
  convs = [w for w in leaves if _has_taps(w)]
  for name, fn in TAP_SUMS.items():
    read = jax.jit(lambda ls, fn=fn: [fn(w) for w in ls])
    out[name] = (lambda ls, read=read: (jax.block_until_ready(read(ls)), ls)[1], convs)
  cycle = lambda p: enorm_jax.balance(p, graph, schedule="parallel")[0]
  out["cycle"] = (_compiled(cycle, params), copy())
  with _swapped("divide", lambda x, t: x / t):
    out["cycle_plain_division"] = (_compiled(cycle, params), copy())
  return out


def main():
  args = _common.parser(__doc__).parse_args()
  model = ResNet18C()
  params = _common.init_params(model, (1, 224, 224, 3))
  ms = _common.interleaved_ms(steps(params, model.rescaling_graph(params)),
                              5 if args.quick else 30)
  record = dict(model="ResNet-18C", floor_ms=ms["floor"],
                **{name: t / ms["floor"] for name, t in ms.items() if name != "floor"})
  _common.emit([record], list(record), args.json)


if __name__ == "__main__":
  main()
