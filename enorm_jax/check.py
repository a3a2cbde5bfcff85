"""`check_graph`: numerical proof that a `RescalingGraph` preserves a function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enorm_jax import _paths
from enorm_jax.balance import rescale, rescale_tree
from enorm_jax.graph import RescalingGraph, require_graph


@dataclasses.dataclass
class CheckReport:
  """Result of `check_graph`.

  Attributes:
    max_error: the largest relative output error over the random rescalings.
    unexercised: group label -> unit indices whose activations are zero on the
      example inputs, so the check could not test them (e.g. dead ReLUs).
  """

  max_error: float
  unexercised: dict[str, list[int]]


def _relative_error(a, b) -> float:
  errors = [float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(errors, default=0.0)


def _with_random_biases(params, graph, key):
  """Makes biases non-zero so they are tested: every bias and carried leaf of the
  graph, and every all-zero float leaf (biases are usually initialised to 0, and
  a bias the graph forgot must show up too)."""
  leaves = _paths.leaves_by_path(params)
  targets = {e.path for g in graph for e in g.biases + g.consumer_biases + g.carried}
  targets |= {p for p, v in leaves.items() if jnp.issubdtype(jnp.result_type(v), jnp.floating)
              and np.size(v) and not np.any(np.asarray(v))}
  keys = dict(zip(sorted(targets), jax.random.split(key, max(len(targets), 1))))
  return _paths.map_with_path_str(
      lambda p, v: v + 0.1 * jax.random.normal(keys[p], v.shape, v.dtype)
      if p in targets else v, params), leaves


def _default_rtol(*trees: Any) -> float:
  """1e-4, or 8 machine epsilons of the least precise floating leaf if larger."""
  eps = [float(jnp.finfo(jnp.result_type(v)).eps) for tree in trees
         for v in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(v), jnp.floating)]
  return max([1e-4] + [8 * e for e in eps])


def _power_of_two_scales(key, graph, sigma):
  """Random factors 2^k with k a non-zero integer (|k| about sigma / ln 2): scaling
  by them is exact in every floating dtype, so a valid graph changes the output
  only through ops that are not exactly scale-equivariant (e.g. a norm's eps)."""
  keys = jax.random.split(key, len(graph))
  scales = []
  for k, g in zip(keys, graph):
    z = sigma * jax.random.normal(k, (g.size,)) / np.log(2.0)
    exponent = jnp.where(z < 0, -1.0, 1.0) * (1.0 + jnp.floor(jnp.abs(z)))
    scales.append(jnp.exp2(exponent))
  return tuple(scales)


def _failing_groups(f, params, y, graph, key, rtol, sigma):
  """``(error, None)`` if rescaling every group at once keeps ``f``'s output ``y``
  within ``rtol``; else ``(error, [(index, error alone), ...])`` for the groups
  that change it when rescaled alone."""
  rtol = _default_rtol(params, y) if rtol is None else rtol
  scales = _power_of_two_scales(jax.random.fold_in(key, 1), graph, sigma)
  error = _relative_error(f(rescale(params, scales, graph)), y)
  if error <= rtol:
    return error, None
  ones = tuple(jnp.ones_like(s) for s in scales)
  failing = []
  for i in range(len(graph)):
    e = _relative_error(f(rescale(params, ones[:i] + (scales[i],) + ones[i + 1:], graph)), y)
    if not e <= rtol:
      failing.append((i, e))
  return error, failing


def groups_changing_the_function(apply_fn: Callable[..., Any], params: Any,
                                 graph: RescalingGraph, *example_args,
                                 **example_kwargs) -> list[tuple[int, float]]:
  """``[(group index, relative output error), ...]`` of the groups that change
  ``apply_fn``'s output when rescaled alone by powers of two (`check_graph`'s
  test, with its default tolerance); empty when the whole graph passes."""
  key = jax.random.key(0)
  params, _ = _with_random_biases(params, graph, key)
  f = jax.jit(lambda p: apply_fn(p, *example_args, **example_kwargs))
  _, failing = _failing_groups(f, params, f(params), graph, key, None, 1.0)
  return failing or []


def check_graph(apply_fn: Callable[..., Any], params: Any, graph: RescalingGraph,
                *example_args, rtol: float | None = None, sigma: float = 1.0,
                seed: int = 0, **example_kwargs) -> CheckReport:
  """Checks that rescaling ``params`` along ``graph`` leaves ``apply_fn`` unchanged.

  Every unit is rescaled by a random power of two other than 1 (with non-zero
  biases) and the outputs are compared; if they differ by more than ``rtol``
  (relative), each group is tried alone and the failing ones are named.
  Scaling by powers of two is exact in every floating dtype, so a valid graph
  passes in bf16 and fp16 too, while a wrong one changes the output by order
  1. The default ``rtol`` is 1e-4, or 8 machine epsilons of the least precise
  param or output dtype if larger (for ops such as a norm's eps).

  Args:
    apply_fn: ``apply_fn(params, *example_args, **example_kwargs)``.
    params: the pytree the graph's paths point into.
    graph: the `RescalingGraph` to check.
    *example_args: example inputs (a few examples, so that units are active).
    rtol: relative output tolerance; ``None`` for the dtype-aware default above.
    sigma: spread of the random factors' natural log (``|k|`` is about
      ``sigma / ln 2``, at least 1).
    seed: seed of the random biases and factors.
    **example_kwargs: keyword inputs of ``apply_fn``.

  Returns:
    A `CheckReport`; its ``unexercised`` lists units that are dead on the
    example inputs (their producers' outputs are zero), which no output
    comparison can test.

  Raises:
    ValueError: naming each offending group with its producers and consumers.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jax.random.normal(jax.random.key(1), (16, 4))
    >>> params = mlp.init(jax.random.key(0), x)['params']
    >>> apply = lambda p, x: mlp.apply({'params': p}, x)
    >>> report = enorm_jax.check_graph(apply, params, enorm_jax.trace_graph(apply, params, x), x)
    >>> report.max_error < 1e-6
    True

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, §3.1 (the rescaling
    symmetry of ReLU networks).
  """
  require_graph(graph).validate(params)
  key = jax.random.key(seed)
  params, _ = _with_random_biases(params, graph, key)
  f = jax.jit(lambda p: apply_fn(p, *example_args, **example_kwargs))
  y = f(params)
  error, failing = _failing_groups(f, params, y, graph, key, rtol, sigma)
  if failing is not None:
    bad = [f"group [{i}] {graph.groups[i].label} (relative error {e:.2e}): producers "
           f"{[p.path for p in graph.groups[i].producers]}, biases "
           f"{[p.path for p in graph.groups[i].biases]}, consumers "
           f"{[p.path for p in graph.groups[i].consumers]}, carried "
           f"{[p.path for p in graph.groups[i].carried]}" for i, e in failing]
    raise ValueError(
        f"The graph does not preserve the function (relative error {error:.2e} > rtol="
        f"{rtol or _default_rtol(params, y):g}). Offending groups:\n  "
        + "\n  ".join(bad or ["(only jointly)"]))

  # Dead units: the output does not depend on scaling their activations.
  def producer_scaled(log_scales):
    out = f(rescale_tree(params, tuple(jnp.exp(s) for s in log_scales), graph, signs=(1,)))
    return sum(jnp.sum(o * w) for o, w in zip(jax.tree.leaves(out), weights))

  weights = [jax.random.normal(jax.random.fold_in(key, 2 + i), o.shape, o.dtype)
             for i, o in enumerate(jax.tree.leaves(y))]
  sensitivity = jax.grad(producer_scaled)(tuple(jnp.zeros((g.size,)) for g in graph))
  unexercised = {}
  for g, s in zip(graph, sensitivity):
    dead = np.nonzero(np.asarray(s) == 0)[0].tolist()
    if dead:
      unexercised[g.label] = dead
  return CheckReport(max_error=error, unexercised=unexercised)
