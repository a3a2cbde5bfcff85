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

import collections
import dataclasses
import itertools
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
from enorm_jax.graph import Entry, Group, RescalingGraph
from enorm_jax.trace_core import (ACTIVATION, UNSCALED, ParamView, Scaled, TraceStop, Tracer,
                                  rule_for, taint_all)

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
  graph, stopped = _build_graph(tr, paths)
  graph = _mark_partial(graph, shapes)
  stopped += _unaccounted(graph, stopped, tr, paths, leaves)
  return TraceReport(graph, stopped)


def _build_graph(tr: Tracer, paths: list[str]) -> tuple[RescalingGraph, list[str]]:
  classes: dict[int, list[int]] = collections.defaultdict(list)
  for u, root in enumerate(tr.roots().tolist()):
    classes[root].append(u)
  # Per class: which (role, path) leaves it touches, in order of first appearance.
  # A unit whose factor is the inverse of its class's (a key projection's, tied to
  # the queries) plays the opposite role: producers are divided, consumers multiplied.
  signature: dict[int, dict[tuple[str, str], None]] = collections.defaultdict(dict)
  leaf_classes: dict[tuple[str, str], np.ndarray] = {}
  table, parity = tr.roots(), tr.parities()
  for (role, path), units in tr.leaf_units.items():
    used = units >= 0
    roots = np.where(used, table[np.maximum(units, 0)], UNSCALED)
    inverse = used & (parity[np.maximum(units, 0)] == 1)
    for key, mask in (((role, path), used & ~inverse), (("inverse_" + role, path), inverse)):
      if mask.any():
        previous = leaf_classes.get(key, np.full(units.shape, UNSCALED, np.int64))
        leaf_classes[key] = np.where(mask, roots, previous)
        for r in np.unique(roots[mask]).tolist():
          signature[r][key] = None
  reasons: dict[str, str] = {}
  valid = {}
  for root, members in classes.items():
    sig = signature.get(root, {})
    roles = {role for role, _ in sig}
    touched = {p for _, p in sig}
    problem = next((tr.stopped[u] for u in members if u in tr.stopped), None)
    if problem is None:
      problem = next((f"{p} is {tr.tainted[p]}" for p in touched if p in tr.tainted), None)
    fields = {_GROUP_FIELD[role] for role in roles}
    if problem is None and None in fields:
      problem = "a carried value (a running mean) would need the inverse factor"
    if problem is None and not {"producers", "consumers"} <= fields:
      problem = "not read by any later parameterized layer" if "producers" in fields \
          else "not produced by a parameterized layer"
    if problem is None and any(
        {_GROUP_FIELD[r] for r, q in sig if q == p} >= {"producers", "consumers"}
        for p in touched):
      problem = "a parameter both produces and consumes the same units (weight sharing)"
    if problem is None:
      valid[root] = tuple(sig)
    else:
      producer = tr.unit_producer[root]
      reasons.setdefault(f"{producer.rsplit('/', 1)[0]} outputs", problem)
  by_signature: dict[tuple, list[int]] = collections.defaultdict(list)
  for root, sig in valid.items():
    by_signature[sig].append(root)
  groups = []
  for sig, roots in by_signature.items():
    group, problem = _make_group(sig, set(roots), leaf_classes)
    anchor = next(p for role, p in sig if role in ("producer", "inverse_consumer"))
    if group is None:
      reasons.setdefault(f"{anchor.rsplit('/', 1)[0]} outputs", problem)
    else:
      first = min(classes[r][0] for r in roots)
      groups.append((first, group))
  groups.sort(key=lambda g: g[0])
  stopped = [f"{k}: {v}" for k, v in reasons.items()]
  return RescalingGraph(tuple(g for _, g in groups)), stopped


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


# Tracer role -> Group field; "inverse_" roles belong to units tied inverse to their class.
_GROUP_FIELD = {"producer": "producers", "consumer": "consumers", "bias": "biases",
                "carried": "carried", "inverse_producer": "consumers",
                "inverse_consumer": "producers", "inverse_bias": "consumer_biases",
                "inverse_carried": None}


def _make_group(sig, roots, leaf_classes):
  order = None
  entries = collections.defaultdict(list)
  for role, path in sig:
    classes = np.where(np.isin(leaf_classes[(role, path)], list(roots)),
                       leaf_classes[(role, path)], UNSCALED)
    fit = _fit_entry(path, classes, len(roots))
    if fit is None:
      return None, f"{path}: its units do not form an axis-aligned layout"
    entry, sequence = fit
    if order is None:
      order = sequence
    elif sequence != order:
      return None, f"{path}: its units are in a different order than the group's"
    entries[_GROUP_FIELD[role]].append(entry)
  anchor = next(p for role, p in sig if role in ("producer", "inverse_consumer"))
  name = f"{anchor.rsplit('/', 1)[0]} outputs"
  return Group(len(order), **{f: tuple(e) for f, e in entries.items()}, name=name), None


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _candidate_views(shape):
  """(view, axes) candidates, from simplest to most general."""
  shape = tuple(shape)
  for a in range(len(shape)):
    yield None, (a,)
  for a in range(len(shape)):
    for outer in _divisors(shape[a]):
      for inner in _divisors(shape[a] // outer):
        if outer == 1 and inner == 1:
          continue
        mid = shape[a] // (outer * inner)
        yield shape[:a] + (outer, mid, inner) + shape[a + 1:], (a + 1,)
  for a, b in itertools.permutations(range(len(shape)), 2):
    for g in _divisors(shape[b])[1:]:
      view = shape[:b] + (g, shape[b] // g) + shape[b + 1:]
      a_view = a if a < b else a + 1
      yield view, (b, a_view)
  # Units on one axis and the inner part of another, e.g. rotary embeddings' pairs
  # (d, d + head_dim / 2) sharing one unit per (head, d mod head_dim / 2).
  for a, b in itertools.permutations(range(len(shape)), 2):
    for g in _divisors(shape[b])[1:]:
      view = shape[:b] + (g, shape[b] // g) + shape[b + 1:]
      a_view = a if a < b else a + 1
      yield view, tuple(sorted((a_view, b + 1)))


def _fit_entry(path, classes, n):
  """An `Entry` whose unit sequence reproduces ``classes`` (element -> class or -1)."""
  for view, axes in _candidate_views(classes.shape):
    v = classes if view is None else classes.reshape(view)
    rest = [d for d in range(v.ndim) if d not in axes]
    moved = np.transpose(v, list(axes) + rest).reshape(
        int(np.prod([v.shape[a] for a in axes])), -1)
    if (moved.min(axis=1) != moved.max(axis=1)).any():
      continue
    seq = moved[:, 0]
    inside = np.nonzero(seq >= 0)[0]
    if len(inside) != n or inside[-1] - inside[0] + 1 != n:
      continue
    sequence = seq[inside[0]:inside[-1] + 1].tolist()
    if len(set(sequence)) != n:
      continue
    axis = axes[0] if len(axes) == 1 else axes
    return Entry(path, axis, view=view, offset=int(inside[0])), sequence
  return None

