"""`trace_graph`: derive a `RescalingGraph` from any JAX/Flax function by jaxpr tracing.

The function is traced to a jaxpr and interpreted abstractly. Every value gets a
*tag* saying how it depends on hidden-unit scalings:

* `Scaled`: element ``i`` is multiplied by ``d[units[i]]`` when the units are
  rescaled (``units[i] = -1``: not scaled). Created at the output channels of
  every ``dot_general``/``conv`` whose kernel is a parameter.
* `ParamView`: element ``i`` is ``leaf[index[i]]`` of one parameter (reshaped,
  broadcast, ...), possibly times unscaled factors.
* no tag: a value that no hidden-unit scaling changes.

A rule per primitive maps input tags to output tags and records *events*: a
parameter slice that produces, consumes or carries units, or units that must be
dropped because an op does not commute with positive per-unit scaling. Units tied
by a residual add are merged (union-find). Unknown primitives stop every unit they
touch, so the tracer may miss a valid group but does not return a wrong one.
The built-in rules are in `enorm_jax.trace_rules`; `register_rule` adds more
(`enorm_jax.trace_core` documents the tags a rule sees).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from enorm_jax import paths as tree_paths
from enorm_jax import trace_contractions, trace_rules  # noqa: F401  (register the rules)
from enorm_jax import trace_groups
from enorm_jax.graph import RescalingGraph
from enorm_jax.trace_core import (ACTIVATION, ParamView, Scaled, TraceStop, Tracer, rule_for,
                                  taint_all)

_SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn):
  for name in _SUB_JAXPR_PARAMS:
    sub = eqn.params.get(name)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr):
      return sub, ()
  return None


_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "jax", "jaxlib", "flax", "optax", "enorm_jax", "chex", "numpy"))


def _where(eqn) -> str:
  """The user's line that made ``eqn`` (the innermost frame outside jax, flax,
  optax and this library), with the innermost library frame as a detail."""
  try:
    frames = list(eqn.source_info.traceback.frames)
  except AttributeError:  # pragma: no cover - no traceback recorded
    return "an unknown location"

  def fmt(f):
    return f"{f.file_name}:{f.line_num} ({f.function_name})"
  library = [f for f in frames if any(d in f.file_name for d in _LIBRARY_DIRS)]
  user = next((f for f in frames if not any(d in f.file_name for d in _LIBRARY_DIRS)
               and not f.file_name.startswith("<frozen")), None)
  inner = next((f for f in library if f"{os.sep}jax{os.sep}" not in f.file_name
                and f"{os.sep}enorm_jax{os.sep}" not in f.file_name), None)
  if user is None:
    return fmt(inner) if inner is not None else "an unknown location"
  return fmt(user) + (f", inside {fmt(inner)}" if inner is not None else "")


def _interpret(tr: Tracer, jaxpr, consts, in_tags) -> list:
  env: dict[Any, Any] = {}

  def read(v):
    if isinstance(v, jcore.Literal):
      return np.asarray(v.val)
    return env.get(v)

  for v in jaxpr.constvars:
    # Closed-over arrays (e.g. batch statistics) may change later: their values
    # are not trusted, only jaxpr literals and what is computed from them.
    env[v] = None
  del consts
  for v, t in zip(jaxpr.invars, in_tags):
    env[v] = t
  for eqn in jaxpr.eqns:
    tags = [read(v) for v in eqn.invars]
    tr.where, tr.primitive = _where(eqn), eqn.primitive.name
    involved = any(isinstance(t, (Scaled, ParamView)) for t in tags)
    if not involved:
      outs = [ACTIVATION if any(t is ACTIVATION for t in tags) else None] * len(eqn.outvars)
      if all(isinstance(t, np.ndarray) for t in tags) and eqn.primitive.name in (
          "broadcast_in_dim", "convert_element_type", "reshape"):
        try:
          outs = [np.asarray(eqn.primitive.bind(*tags, **eqn.params))]
        except Exception:
          pass
    else:
      sub = _sub_jaxpr(eqn)
      rule = rule_for(eqn.primitive.name)
      if sub is not None and rule is None:
        outs = _interpret(tr, sub[0], sub[1], tags)
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
    for v, t in zip(eqn.outvars, outs):
      env[v] = t
  return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass
class TraceReport:
  """What `trace_graph` found: the graph, and the units it had to leave out, and why."""

  graph: RescalingGraph
  stopped: list[str]

  def describe(self) -> str:
    lines = [self.graph.describe()]
    if self.stopped:
      lines.append("Not rescalable:")
      lines += [f"  - {s}" for s in self.stopped]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.describe()


def trace_graph(apply_fn: Callable[..., Any], params: Any, *example_args,
                **example_kwargs) -> RescalingGraph:
  """Derives the `RescalingGraph` of ``apply_fn(params, *example_args)`` automatically.

  Every group of hidden units whose positive rescaling leaves the output
  unchanged is found by following each parameter kernel's output channels
  through the jaxpr: through ReLU/leaky ReLU, max- and average-pooling,
  reshapes (flatten gives strided index maps), transposes, slices, pads,
  concatenations, bias adds, products with unscaled factors, residual adds
  (which merge groups), eval-mode BatchNorm (pass the full variables, so the
  running mean is a leaf) and ``jit``/``custom_jvp``/``custom_vjp``/remat
  sub-jaxprs. A norm's scale broadcast over an activation (LayerNorm, RMSNorm)
  produces units; two scaled values contracted together (attention's ``q . k``)
  tie their units inverse, giving a query/key group with the key side divided.
  Any other op stops the units it touches.

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)``.
    params: the pytree whose leaves may be rescaled; graph paths point into it.
      For Linen use ``lambda p, x: model.apply({'params': p}, x)``; for NNX,
      ``lambda s, x: nnx.merge(graphdef, s)(x)`` with ``graphdef, s = nnx.split(model)``.
    *example_args: example inputs (batch size 1 is enough; only shapes matter).
    **example_kwargs: keyword inputs of ``apply_fn``.

  Returns:
    The `RescalingGraph`. An empty one comes with a warning that says why;
    `explain_graph` also returns the reason for every unit left out.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> graph = enorm_jax.trace_graph(lambda p, x: mlp.apply({'params': p}, x), params,
    ...                               jnp.ones((1, 4)))
    >>> graph.num_units
    8
  """
  report = explain_graph(apply_fn, params, *example_args, **example_kwargs)
  if not report.graph.groups:
    warnings.warn("trace_graph found no rescalable units:\n  " + "\n  ".join(report.stopped),
                  stacklevel=2)
  return report.graph


def explain_graph(apply_fn: Callable[..., Any], params: Any, *example_args,
                  **example_kwargs) -> TraceReport:
  """`trace_graph`, with the reason for every kernel-like parameter left out.

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)``.
    params: the pytree whose leaves may be rescaled.
    *example_args: example inputs (batch size 1 is enough).
    **example_kwargs: keyword inputs of ``apply_fn``.

  Returns:
    A `TraceReport`: ``graph``, and ``stopped``, one line per layer or parameter
    that is not rescalable, with the op and the user's source line that stopped it.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> report = enorm_jax.explain_graph(lambda p, x: mlp.apply({'params': p}, x), params,
    ...                                  jnp.ones((1, 4)))
    >>> report.stopped[0]
    'layers_0 outputs: pass through tanh, which has no tracer rule [tanh] at ...'
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_paths.key_path_str(kp) for kp, _ in flat]
  leaves = [leaf for _, leaf in flat]
  shapes = {p: tuple(np.shape(leaf)) for p, leaf in zip(paths, leaves)}
  # Array inputs become jaxpr inputs (tagged ACTIVATION); anything else stays static.
  inputs, input_tree = jax.tree.flatten((example_args, example_kwargs))
  dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in inputs]

  def call(p, arrays):
    it = iter(arrays)
    args, kwargs = jax.tree.unflatten(
        input_tree, [next(it) if d else x for x, d in zip(inputs, dynamic)])
    return apply_fn(p, *args, **kwargs)

  arrays = [x for x, d in zip(inputs, dynamic) if d]
  closed = jax.make_jaxpr(call)(params, arrays)
  tr = Tracer(shapes)
  in_tags = [ParamView(p, np.arange(int(np.prod(s)), dtype=np.int64).reshape(s))
             if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else None
             for p, s, leaf in zip(paths, shapes.values(), leaves)]
  in_tags += [ACTIVATION] * len(arrays)
  outs = _interpret(tr, closed.jaxpr, closed.consts, in_tags)
  tr.where, tr.primitive = "the function's output", "output"
  for t in outs:
    if isinstance(t, Scaled):
      tr.stop(t.units, "are outputs of the function, not hidden units")
    elif isinstance(t, ParamView):
      tr.taint(t.path, "returned as an output")
  graph, stopped = trace_groups.build_graph(tr, paths)
  graph = _mark_partial(graph, shapes)
  stopped += _unaccounted(graph, stopped, tr, paths, leaves)
  return TraceReport(graph, stopped)



def _unaccounted(graph, stopped, tr, paths, leaves) -> list[str]:
  """Reasons for every kernel-like parameter (ndim >= 2, or a norm's ``scale``) that
  is in no group and not yet explained, so that the report covers them all."""
  in_graph = {e.path for g in graph for e in g.multiplied + g.divided}
  explained = {line.split(" outputs: ")[0] for line in stopped}
  lines = []
  if not paths:
    return ["the params pytree has no leaves"]
  for path, leaf in zip(paths, leaves):
    dtype = jnp.result_type(leaf)
    kernel_like = np.ndim(leaf) >= 2 or path.rsplit("/", 1)[-1] == "scale"
    if not kernel_like or path in in_graph or path.rsplit("/", 1)[0] in explained:
      continue
    if not jnp.issubdtype(dtype, jnp.floating):
      reason = f"has dtype {dtype}: only floating-point parameters can be rescaled"
    elif path in tr.tainted:
      reason = tr.tainted[path]
    else:
      reason = ("its outputs reach no rescalable unit: it is not the kernel of a dot "
                "product or convolution whose output channels pass only through "
                "rescalable ops to another parameterized layer")
    lines.append(f"{path}: {reason}")
  return lines


def _mark_partial(graph: RescalingGraph, shapes) -> RescalingGraph:
  """Marks ``partial`` the entries of axes whose other positions were stopped."""
  leaves = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()}
  gaps = graph.coverage_gaps(leaves)
  if not gaps:
    return graph

  def mark(entries):
    return tuple(dataclasses.replace(e, partial=True)
                 if (e.path, e.resolved(shapes[e.path]).axes) in gaps else e
                 for e in entries)
  return RescalingGraph(tuple(
      dataclasses.replace(g, producers=mark(g.producers), consumers=mark(g.consumers),
                          carried=mark(g.carried), biases=mark(g.biases),
                          consumer_biases=mark(g.consumer_biases))
      for g in graph))
