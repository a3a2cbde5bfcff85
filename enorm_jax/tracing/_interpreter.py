"""The tracer's interpreter: a jaxpr evaluated on tags instead of values.

Each equation's input tags (`enorm_jax.tracing._core` documents them) go to the
rule of its primitive, which returns the output tags. A call primitive without
a rule (``pjit``, ``custom_jvp_call``, ``remat``, ...) is interpreted inside; a
primitive without a rule stops every unit it touches, so the tracer may miss a
valid group but never builds a wrong one. Reasons name the user's source line.
"""

from __future__ import annotations

import os
import sysconfig
from typing import Any

import numpy as np
from jax.extend import core as jcore

from enorm_jax.tracing._core import (ACTIVATION, ParamView, Scaled, TraceState, TraceStop,
                                     rule_for, taint_all)

_SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn):
  for name in _SUB_JAXPR_PARAMS:
    sub = eqn.params.get(name)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr
    if isinstance(sub, jcore.Jaxpr):
      return sub
  return None


def _has_jaxprs(eqn) -> bool:
  """Whether an equation carries sub-jaxprs (a call, a loop, a branch)."""
  values = [v for p in eqn.params.values() for v in (p if isinstance(p, tuple) else (p,))]
  return any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)) for v in values)


_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "jax", "jaxlib", "flax", "optax", "enorm_jax", "chex", "numpy"))


_STDLIB = sysconfig.get_paths()["stdlib"]  # contextlib, functools: never the user's line


def _is_stdlib(file_name: str) -> bool:
  return file_name.startswith("<frozen") or (file_name.startswith(_STDLIB)
                                             and "-packages" not in file_name)


def _where(eqn, outer: str) -> str:
  """The user's line that made ``eqn`` (the innermost frame outside jax, flax,
  optax and this library), with the innermost library frame as a detail."""
  try:
    frames = list(eqn.source_info.traceback.frames)
  except AttributeError:  # pragma: no cover - no traceback recorded
    return outer

  def fmt(f):
    return f"{f.file_name}:{f.line_num} ({f.function_name})"
  library = [f for f in frames if any(d in f.file_name for d in _LIBRARY_DIRS)]
  user = next((f for f in frames if not any(d in f.file_name for d in _LIBRARY_DIRS)
               and not _is_stdlib(f.file_name)), None)
  inner = next((f for f in library if f"{os.sep}jax{os.sep}" not in f.file_name
                and f"{os.sep}enorm_jax{os.sep}" not in f.file_name), None)
  if user is None:
    return fmt(inner) if inner is not None else outer
  return fmt(user) + (f", inside {fmt(inner)}" if inner is not None else "")


MAX_FOLDED = 1 << 16  # constants computed from literals up to this many elements


def interpret(tr: TraceState, jaxpr, in_tags: list,
              outer: str = "an unknown location") -> list:
  """The output tags of ``jaxpr`` given its input tags, recording events on ``tr``.

  Closed-over constants are untrusted (``None``): they may change later. An
  equation without a source line of its own (inside a ``custom_jvp`` rule, say)
  is reported at ``outer``, the line of the call that contains it.
  """
  env: dict[Any, Any] = {}

  def read(v):
    if isinstance(v, jcore.Literal):
      return np.asarray(v.val)
    return env.get(v)

  for v in jaxpr.constvars:
    env[v] = None
  for v, t in zip(jaxpr.invars, in_tags):
    env[v] = t
  for eqn in jaxpr.eqns:
    tags = [read(v) for v in eqn.invars]
    where = _where(eqn, outer)
    with tr.visiting(eqn.primitive.name, where):
      outs = _equation(tr, eqn, tags, where)
    for v, t in zip(eqn.outvars, outs):
      env[v] = t
  return [read(v) for v in jaxpr.outvars]


def _equation(tr: TraceState, eqn, tags: list, where: str) -> list:
  """The output tags of one equation."""
  if not any(isinstance(t, (Scaled, ParamView)) for t in tags):
    outs = [ACTIVATION if any(t is ACTIVATION for t in tags) else None] * len(eqn.outvars)
    if (all(isinstance(t, np.ndarray) for t in tags) and not _has_jaxprs(eqn)
        and sum(np.prod(v.aval.shape, dtype=int) for v in eqn.outvars) <= MAX_FOLDED):
      try:
        outs = [np.asarray(eqn.primitive.bind(*tags, **eqn.params))]
      except Exception:  # pylint: disable=broad-except  (an unknown constant is fine)
        pass
    return outs
  rule = rule_for(eqn.primitive.name)
  sub = _sub_jaxpr(eqn) if rule is None else None
  if sub is not None:
    outs = interpret(tr, sub, tags, where)
  elif rule is None:
    taint_all(tr, tags, f"pass through {eqn.primitive.name}, which has no tracer rule")
    outs = [None] * len(eqn.outvars)
  else:
    try:
      outs = rule(tr, eqn, tags)
    except TraceStop as e:
      taint_all(tr, tags, str(e))
      outs = [None] * len(eqn.outvars)
  if any(isinstance(t, Scaled) or t is ACTIVATION for t in tags):
    outs = [ACTIVATION if o is None else o for o in outs]
  return outs
