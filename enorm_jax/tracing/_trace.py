"""`trace_graph` and `explain_graph`: a `RescalingGraph` from any JAX/Flax function.

The function is traced to a jaxpr and interpreted on tags
(`enorm_jax.tracing._interpreter`; the tags are documented in
`enorm_jax.tracing._core`). Rules record which parameter slices produce,
consume or carry which units and which units must be stopped; units tied by a
residual add are merged; `enorm_jax.tracing._groups` turns the finished trace
into groups.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enorm_jax import _paths
from enorm_jax._resolve import resolve_entry
from enorm_jax.check import groups_changing_the_function
from enorm_jax.graph import RescalingGraph
from enorm_jax.tracing import _contractions, _control, _rules  # noqa: F401  (the rules)
from enorm_jax.tracing._core import ACTIVATION, ParamView, Scaled, TraceState
from enorm_jax.tracing._groups import build_graph
from enorm_jax.tracing._interpreter import interpret

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
  Any other op stops the units it touches. Before returning, every group is
  checked on the example inputs as `check_graph` does (random powers of two, exact
  in every dtype); a group that changes the output is left out, with its reason.

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
    >>> import jax.numpy as jnp, enorm_jax
    >>> params = {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 2))}
    >>> net = lambda p, x: jnp.tanh(x @ p['w1']) @ p['w2']
    >>> enorm_jax.explain_graph(net, params, jnp.ones((1, 4))).stopped[0]
    'w1 outputs: pass through tanh, which has no tracer rule [tanh] at ...'
  """
  paths, leaves, _ = _paths.flatten_with_paths(params)
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
  tr = TraceState(shapes)
  in_tags = [ParamView(p, np.arange(int(np.prod(s)), dtype=np.int64).reshape(s))
             if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else None
             for p, s, leaf in zip(paths, shapes.values(), leaves)]
  in_tags += [ACTIVATION] * len(arrays)
  outs = interpret(tr, closed.jaxpr, in_tags)
  with tr.visiting("output", "the function's output"):
    for t in outs:
      if isinstance(t, Scaled):
        tr.stop(t.units, "are outputs of the function, not hidden units")
      elif isinstance(t, ParamView):
        tr.taint(t.path, "returned as an output")
  graph, stopped = build_graph(tr, paths)
  graph, stopped = _proved(apply_fn, params, _mark_partial(graph, shapes), stopped,
                           example_args, example_kwargs)
  graph = _mark_partial(graph, shapes)
  stopped += _unaccounted(graph, stopped, tr, paths, leaves)
  return TraceReport(graph, stopped)



def _proved(apply_fn, params, graph, stopped, example_args, example_kwargs):
  """The graph without the groups that change the function on the example inputs
  when rescaled alone by powers of two (`check_graph`'s test), each with a reason."""
  if not graph.groups:
    return graph, stopped
  try:
    failing = groups_changing_the_function(apply_fn, params, graph, *example_args,
                                           **example_kwargs)
  except Exception as e:  # pylint: disable=broad-except  (e.g. a function needing rngs)
    warnings.warn(f"trace_graph could not check its graph on the example inputs ({e!r}); "
                  "check it with enorm_jax.check_graph.", stacklevel=4)
    return graph, stopped
  if not failing:
    return graph, stopped
  bad = {i for i, _ in failing}
  lines = []
  for i, e in failing:
    name = graph.groups[i].name or graph.groups[i].label
    lines.append(f"{name}: rescaling this group changes the function's output on the "
                 f"example inputs (relative error {e:.1e} under powers of two), so the "
                 "tracer misread an op on its path; it is left out")
    lines += [f"{path}: in {name!r}, left out above" for path in dict.fromkeys(
        graph.groups[i].scaled_paths()) if path.rsplit("/", 1)[0] + " outputs" != name]
  stopped = stopped + lines
  return RescalingGraph(tuple(g for i, g in enumerate(graph) if i not in bad)), stopped


def _unaccounted(graph, stopped, tr, paths, leaves) -> list[str]:
  """Reasons for every kernel-like parameter (ndim >= 2, or a norm's ``scale``) that
  is in no group and not yet explained, so that the report covers them all."""
  in_graph = {e.path for g in graph for e in g.multiplied + g.divided}
  explained = {line.split(": ")[0].removesuffix(" outputs") for line in stopped}
  lines = []
  if not paths:
    return ["the params pytree has no leaves"]
  for path, leaf in zip(paths, leaves):
    dtype = jnp.result_type(leaf)
    kernel_like = np.ndim(leaf) >= 2 or path.rsplit("/", 1)[-1] == "scale"
    if (not kernel_like or path in in_graph or path in explained
        or path.rsplit("/", 1)[0] in explained):
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
                 if (e.path, resolve_entry(e, shapes[e.path]).axes) in gaps else e
                 for e in entries)
  return RescalingGraph(tuple(
      dataclasses.replace(g, producers=mark(g.producers), consumers=mark(g.consumers),
                          carried=mark(g.carried), biases=mark(g.biases),
                          consumer_biases=mark(g.consumer_biases))
      for g in graph))
