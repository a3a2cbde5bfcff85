"""`chain_graph`: the `RescalingGraph` of a sequential chain of Dense and Conv layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from enorm_jax import _paths
from enorm_jax.graph import Entry, Group, RescalingGraph


def _module_params(params: Any, layer: str) -> tuple[str, str | None, tuple[int, ...]]:
  leaves = _paths.leaves_by_path(params)
  kernel, bias = f"{layer}/kernel", f"{layer}/bias"
  if kernel not in leaves:
    raise ValueError(
        f"chain_graph: layer {layer!r} has no parameter {kernel!r}. Layers are module "
        f"paths whose kernels are in params; available: {_paths.describe_paths(leaves)}.")
  return kernel, (bias if bias in leaves else None), tuple(leaves[kernel].shape)


def chain_graph(params: Any, layers: Sequence[str]) -> RescalingGraph:
  """The graph of a sequential chain of Dense and Conv layers.

  Hidden units are the output channels of every layer but the last. Between two
  layers there may be ReLU, max- or average-pooling, and, from a Conv to a
  Dense layer, a row-major (NHWC) flatten.

  Args:
    params: the params pytree (e.g. Linen's ``variables['params']``).
    layers: module paths in order, e.g. ``["Dense_0", "Dense_1", "Dense_2"]``.
      Each must have a ``kernel`` (Dense ``(in, out)`` or Conv ``(H, W, in, out)``)
      and may have a ``bias``.

  Returns:
    A `RescalingGraph` with one group per hidden layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2'])
    >>> len(graph), graph.num_units
    (1, 8)
  """
  layers = list(layers)
  if len(layers) < 2:
    raise ValueError(f"chain_graph needs at least two layers, got {layers!r}.")
  groups = []
  for a, b in zip(layers[:-1], layers[1:]):
    ka, bias, shape_a = _module_params(params, a)
    kb, _, shape_b = _module_params(params, b)
    channels = shape_a[-1]
    if len(shape_b) == 2:  # Dense consumer, possibly after a flatten.
      rows = shape_b[0]
      if rows % channels:
        raise ValueError(
            f"chain_graph: {kb!r} has {rows} input rows, which is not a multiple of "
            f"the {channels} output channels of {ka!r}. Is a layer missing from the "
            "chain?")
      view = None if rows == channels else (rows // channels, channels, shape_b[1])
      consumer = Entry(kb, axis=0 if view is None else 1, view=view)
    else:
      if shape_b[-2] != channels:
        raise ValueError(
            f"chain_graph: {kb!r} expects {shape_b[-2]} input channels but {ka!r} "
            f"produces {channels}. Grouped convolutions need trace_graph or a hand-"
            "written graph.")
      consumer = Entry(kb, axis=len(shape_b) - 2)
    groups.append(Group(size=channels,
                        producers=(Entry(ka, axis=len(shape_a) - 1, bias=bias),),
                        consumers=(consumer,), name=f"{a} outputs"))
  graph = RescalingGraph(tuple(groups))
  graph.validate(params)
  return graph

