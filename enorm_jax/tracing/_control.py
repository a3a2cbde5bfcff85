"""The tracer's rules for control flow: ``scan`` (``lax.scan``, ``nn.scan``, ``nn.RNN``,
``fori_loop`` with static bounds), ``while`` (``while_loop``, other ``fori_loop``\ s),
``cond`` (``cond``, ``switch``).

A scan is followed by interpreting its body once per iteration, as if unrolled:
the scanned inputs' tags are sliced at the iteration, the carry's output tags
feed the next iteration, and the per-iteration outputs are stacked. Layers
stacked on a leading axis (``nn.scan`` over layers) thus get their own units per
layer, in the group structure of the unrolled model; a kernel read at every
iteration (a recurrent one) ties its units across iterations.

A while loop runs an unknown number of times: its body is interpreted until the
carry's tags are a fixed point, a carry scaled on entry and on exit tying those
units (a carry scaled only on one side stops). A cond interprets every branch
on the same inputs and joins their outputs the same way, so a group found
inside holds whichever branch runs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from enorm_jax.tracing._core import (ACTIVATION, UNSCALED, ParamView, Scaled, TraceStop, is_const,
                                     rule, taint_all)
from enorm_jax.tracing._interpreter import interpret

MAX_ITERATIONS = 1024  # longer scans stop their units instead of unrolling


def _slice(tag, i: int):
  """The tag of iteration ``i`` of a scanned input (its leading axis)."""
  if isinstance(tag, Scaled):
    return Scaled(tag.units[i])
  if isinstance(tag, ParamView):
    return dataclasses.replace(tag, index=tag.index[i])
  if isinstance(tag, np.ndarray):
    return tag[i]
  return tag


def _stack(tags: list, shape) -> object:
  """One stacked output from its per-iteration tags."""
  if all(isinstance(t, np.ndarray) for t in tags):
    return np.stack(tags)
  if any(isinstance(t, ParamView) for t in tags):
    views = {(t.path, t.shift) for t in tags if isinstance(t, ParamView)}
    if len(views) == 1 and all(isinstance(t, ParamView) for t in tags):
      path, shift = views.pop()
      return ParamView(path, np.stack([t.index for t in tags]), shift)
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


def _join(tr, a, b):
  """One tag for a value that is ``a`` or ``b`` (two branches, two iterations)."""
  for x, y in ((a, b), (b, a)):  # zeros scale with any factor (a zero initial state)
    if isinstance(x, Scaled) and is_const(y, lambda v: np.all(v == 0)):
      return x
  if isinstance(a, Scaled) and isinstance(b, Scaled):
    both = (a.units >= 0) & (b.units >= 0)
    tr.union(a.units[both], b.units[both])
    mixed = (a.units >= 0) != (b.units >= 0)
    if mixed.any():
      tr.stop(np.where(mixed, np.maximum(a.units, b.units), UNSCALED),
              "scaled on one path of a loop or branch only")
    return Scaled(np.where(both, a.units, UNSCALED))
  if isinstance(a, Scaled) or isinstance(b, Scaled):
    for t in (a, b):
      if isinstance(t, Scaled):
        tr.stop(t.units, "scaled on one path of a loop or branch only")
      elif isinstance(t, ParamView):
        tr.taint(t.path, "a parameter on one path of a loop or branch only")
    return ACTIVATION
  if isinstance(a, ParamView) or isinstance(b, ParamView):
    if (isinstance(a, ParamView) and isinstance(b, ParamView) and a.path == b.path
        and a.shift == b.shift and np.array_equal(a.index, b.index)):
      return a
    taint_all(tr, [a, b], "a different parameter on another path of a loop or branch")
    return None
  if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b):
    return a
  return ACTIVATION if ACTIVATION in (a, b) else None


def _same(a, b) -> bool:
  if type(a) is not type(b):
    return False
  if isinstance(a, Scaled):
    return np.array_equal(a.units, b.units)
  if isinstance(a, ParamView):
    return a.path == b.path and a.shift == b.shift and np.array_equal(a.index, b.index)
  if isinstance(a, np.ndarray):
    return np.array_equal(a, b)
  return a is b


MAX_FIXED_POINT_PASSES = 8


@rule("while")
def _while(tr, eqn, tags):
  p = eqn.params
  n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts = tags[:n_cond], tags[n_cond:n_cond + n_body]
  carry = list(tags[n_cond + n_body:])
  for _ in range(MAX_FIXED_POINT_PASSES):
    outs = interpret(tr, p["body_jaxpr"].jaxpr, body_consts + carry, tr.where)
    joined = [_join(tr, a, b) for a, b in zip(carry, outs)]
    if all(_same(a, b) for a, b in zip(joined, carry)):
      break
    carry = joined
  else:
    raise TraceStop("a while loop whose carry does not settle")
  interpret(tr, p["cond_jaxpr"].jaxpr, cond_consts + carry, tr.where)
  return carry


@rule("cond")
def _cond(tr, eqn, tags):
  operands = list(tags[1:])
  outs = [interpret(tr, branch.jaxpr, operands, tr.where) for branch in eqn.params["branches"]]
  return [functools.reduce(lambda a, b: _join(tr, a, b), column) for column in zip(*outs)]
