"""Parameters that an optimizer never moves, read from its update's jaxpr.

``optax.set_to_zero()`` (through ``multi_transform``), ``optax.freeze`` and a
``masked`` zero branch make updates that are zero whatever the gradients, state
and params. `zero_update_paths` finds them by propagating values that are the
same constant at every element through the update's jaxpr: an output that is
such a constant zero belongs to a frozen parameter. Values the propagation
cannot follow are unknown, so a parameter is only reported when its update is
provably zero.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from enorm_jax import _paths

# Ops that keep a uniform value uniform (with the value converted to the output dtype).
_LAYOUT_OPS = frozenset({
    "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p",
    "convert_element_type", "slice", "rev", "concatenate", "pad", "dynamic_slice",
    "optimization_barrier", "reduce_precision"})
# Elementwise ops evaluated on the uniform values themselves (0-d arrays).
_ELEMENTWISE_OPS = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "sqrt", "rsqrt", "exp",
    "log", "pow", "integer_pow", "square", "and", "or", "not", "eq", "ne", "lt", "le", "gt",
    "ge", "add_any"})


def zero_update_paths(inner, updates: Any, inner_state: Any, params: Any,
                      extra_args: dict[str, Any]) -> frozenset[str]:
  """The '/'-paths of the params whose update by ``inner`` is always zero."""
  def update(u, s, p):
    return inner.update(u, s, p, **extra_args)[0]
  try:
    closed, out_shape = jax.make_jaxpr(update, return_shape=True)(updates, inner_state, params)
  except Exception:  # pylint: disable=broad-except  (the real update will raise clearly)
    return frozenset()
  values = _propagate(closed.jaxpr, [None] * len(closed.jaxpr.invars))
  paths, _, _ = _paths.flatten_with_paths(out_shape)
  return frozenset(p for p, v in zip(paths, values) if v is not None and v == 0)


def _propagate(jaxpr, inputs: list) -> list:
  """Per output of ``jaxpr``: the scalar it equals at every element, or ``None``."""
  env: dict[Any, Any] = dict(zip(jaxpr.invars, inputs))

  def read(v):
    if isinstance(v, jcore.Literal):
      value = np.asarray(v.val)
      return value.reshape(-1)[0] if value.size and np.all(value == value.reshape(-1)[0]) \
          else None
    return env.get(v)

  for eqn in jaxpr.eqns:
    outs = _uniform_outputs(eqn, [read(v) for v in eqn.invars])
    for v, out in zip(eqn.outvars, outs):
      env[v] = out
  return [read(v) for v in jaxpr.outvars]


def _uniform_outputs(eqn, values: list) -> list:
  name, n = eqn.primitive.name, len(eqn.outvars)
  if name == "select_n":  # the same value in every case: the predicate does not matter
    cases = values[1:]
    same = all(c is not None for c in cases) and all(c == cases[0] for c in cases)
    return [cases[0] if same else None]
  if name == "cond":  # the same value from every branch
    per_branch = [_propagate(b.jaxpr, values[1:]) for b in eqn.params["branches"]]
    return [outs[0] if all(o is not None and o == outs[0] for o in outs) else None
            for outs in zip(*per_branch)]
  sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
  if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):  # pjit, closed_call, remat
    return _propagate(getattr(sub, "jaxpr", sub), values)
  if any(v is None for v in values) or not values:
    return [None] * n
  dtype = eqn.outvars[0].aval.dtype
  if name in _LAYOUT_OPS and n == 1 and all(v == values[0] for v in values):
    return [np.asarray(values[0]).astype(dtype)[()]]
  if name in _ELEMENTWISE_OPS and n == 1:
    try:
      with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*[np.asarray(v) for v in values], **eqn.params)
      return [np.asarray(out).astype(dtype)[()]]
    except Exception:  # pylint: disable=broad-except
      return [None]
  return [None] * n
