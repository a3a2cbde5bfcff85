"""The tracer's rules for control flow: ``scan`` (``lax.scan``, ``nn.scan``, ``nn.RNN``).

A scan is followed by interpreting its body once per iteration, as if unrolled:
the scanned inputs' tags are sliced at the iteration, the carry's output tags
feed the next iteration, and the per-iteration outputs are stacked. Layers
stacked on a leading axis (``nn.scan`` over layers) thus get their own units per
layer, in the group structure of the unrolled model; a kernel read at every
iteration (a recurrent one) ties its units across iterations.
"""

from __future__ import annotations

import numpy as np

from enorm_jax.tracing._core import ACTIVATION, UNSCALED, ParamView, Scaled, TraceStop, rule
from enorm_jax.tracing._interpreter import interpret

MAX_ITERATIONS = 1024  # longer scans stop their units instead of unrolling


def _slice(tag, i: int):
  """The tag of iteration ``i`` of a scanned input (its leading axis)."""
  if isinstance(tag, Scaled):
    return Scaled(tag.units[i])
  if isinstance(tag, ParamView):
    return ParamView(tag.path, tag.index[i])
  if isinstance(tag, np.ndarray):
    return tag[i]
  return tag


def _stack(tags: list, shape) -> object:
  """One stacked output from its per-iteration tags."""
  if all(isinstance(t, np.ndarray) for t in tags):
    return np.stack(tags)
  if any(isinstance(t, ParamView) for t in tags):
    paths = {t.path for t in tags if isinstance(t, ParamView)}
    if len(paths) == 1 and all(isinstance(t, ParamView) for t in tags):
      return ParamView(paths.pop(), np.stack([t.index for t in tags]))
    raise TraceStop("a parameter stacked with other values by scan")
  if any(isinstance(t, Scaled) for t in tags):
    return Scaled(np.stack([t.units if isinstance(t, Scaled)
                            else np.full(shape[1:], UNSCALED, np.int64) for t in tags]))
  return ACTIVATION if any(t is ACTIVATION for t in tags) else None


@rule("scan")
def _scan(tr, eqn, tags):
  p = eqn.params
  length, n_consts, n_carry = p["length"], p["num_consts"], p["num_carry"]
  if length > MAX_ITERATIONS:
    raise TraceStop(f"scanned over {length} iterations (the tracer unrolls at most "
                    f"{MAX_ITERATIONS})")
  consts, carry, xs = tags[:n_consts], tags[n_consts:n_consts + n_carry], tags[n_consts + n_carry:]
  body, where = p["jaxpr"].jaxpr, tr.where
  ys = {}
  for i in (range(length - 1, -1, -1) if p["reverse"] else range(length)):
    outs = interpret(tr, body, consts + carry + [_slice(t, i) for t in xs], where)
    carry, ys[i] = outs[:n_carry], outs[n_carry:]
  shapes = [tuple(v.aval.shape) for v in eqn.outvars[n_carry:]]
  stacked = [_stack([ys[i][k] for i in range(length)], shape) for k, shape in enumerate(shapes)]
  return list(carry) + stacked
