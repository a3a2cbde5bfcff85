"""The paper's architectures as Flax Linen modules, with their rescaling graphs.

    from enorm_jax.models import FullyConnected, CifarNV, ResNet18C

* `FullyConnected`: 3072 -> 500, ``depth`` layers of 500 x 500, then 500 -> 10 (§6.1).
* `CifarNV`: the fully convolutional CIFAR-NV net of §6.2, official layout.
* `ResNet18C`: ResNet-18 with learned (type-C) 1x1 shortcuts on every block (§4.3, §6.3).

Each takes ``norm`` in ``('none', 'batch', 'group')`` and ``final_bn``, a
BatchNorm on the logits (used by the paper for Baseline and ENorm), whose
statistics are shared over the named axis ``final_bn_axis_name`` when the
forward pass runs per device (the paper shares them across GPUs). Each has a
``rescaling_graph(params)`` method. ENorm never rescales across a
normalization layer, so the graph exists only for ``norm='none'``; the final
BatchNorm comes after the last hidden units and does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from enorm_jax.chain import chain_graph
from enorm_jax.graph import Entry, Group, RescalingGraph

NORMS = ("none", "batch", "group")
xavier = nn.initializers.xavier_uniform()
kaiming = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def _batch_norm(train: bool, **kwargs) -> nn.BatchNorm:
  """BatchNorm with the variance computed as E[(x - E[x])^2].

  Flax's default E[x^2] - E[x]^2 cancels in float32 when the batch shares a large
  common value (a final BatchNorm's logits on two examples: variance 5e-3 under a
  common 1.4e4 comes out as 0), which blows up the normalized output.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_fast_variance=False,
                      **kwargs)


class _Norm(nn.Module):
  """BatchNorm, GroupNorm or nothing, selected by ``kind``."""

  kind: str
  groups: int = 32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "batch":
      return _batch_norm(train, epsilon=1e-5, axis_name=self.bn_axis_name)(x)
    if self.kind == "group":  # the largest group count <= `groups` that divides the width
      groups = max(g for g in range(1, min(self.groups, x.shape[-1]) + 1)
                   if x.shape[-1] % g == 0)
      return nn.GroupNorm(num_groups=groups, use_fast_variance=False)(x)
    return x


def _require_plain(model: Any) -> None:
  if model.norm != "none":
    raise ValueError(
        f"{type(model).__name__}(norm={model.norm!r}) has normalization layers between "
        "its weights, so rescaling across them would not preserve the function. ENorm "
        "is used with norm='none' (plus the optional final_bn).")


class FullyConnected(nn.Module):
  """3072 -> width, ``depth`` hidden layers of width x width, then width -> classes."""

  depth: int = 3
  width: int = 500
  num_classes: int = 10
  use_bias: bool = True
  norm: str = "none"
  gn_groups: int = 10
  final_bn: bool = False
  final_bn_axis_name: str | None = None
  kernel_init: Any = xavier

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    x = x.reshape((x.shape[0], -1))
    for i in range(self.depth + 1):
      x = nn.Dense(self.width, use_bias=self.use_bias, kernel_init=self.kernel_init,
                   name=f"Dense_{i}")(x)
      x = _Norm(self.norm, self.gn_groups, name=f"Norm_{i}")(x, train)
      x = nn.relu(x)
    x = nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                 name=f"Dense_{self.depth + 1}")(x)
    if self.final_bn:
      x = _batch_norm(train, axis_name=self.final_bn_axis_name, name="FinalBN")(x)
    return x

  @property
  def layer_names(self) -> list[str]:
    return [f"Dense_{i}" for i in range(self.depth + 2)]

  def rescaling_graph(self, params) -> RescalingGraph:
    _require_plain(self)
    return chain_graph(params, self.layer_names)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class CifarNV(nn.Module):
  """Fully convolutional CIFAR-NV (Gitman & Ginsburg 2017), as in the official ENorm code.

  conv3x3 128, 128, 128, max-pool 3/2, conv3x3 256, 256, 256, max-pool 3/2,
  conv3x3 320, conv1x1 320, conv1x1 classes, global average pool. ``width``
  scales every hidden width (1.0 is the paper's net).
  """

  num_classes: int = 10
  width: float = 1.0
  use_bias: bool = True
  norm: str = "none"
  gn_groups: int = 32
  final_bn: bool = False
  final_bn_axis_name: str | None = None
  kernel_init: Any = xavier

  def _widths(self) -> list[int]:
    return [max(1, round(w * self.width)) for w in (128, 128, 128, 256, 256, 256, 320, 320)]

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    sizes = [(w, 3) for w in self._widths()[:7]] + [(self._widths()[7], 1)]
    for i, (features, k) in enumerate(sizes):
      x = nn.Conv(features, (k, k), padding="SAME", use_bias=self.use_bias,
                  kernel_init=self.kernel_init, name=f"Conv_{i}")(x)
      x = _Norm(self.norm, self.gn_groups, name=f"Norm_{i}")(x, train)
      x = nn.relu(x)
      if i in (2, 5):
        x = _max_pool(x)
    x = nn.Conv(self.num_classes, (1, 1), use_bias=self.use_bias,
                kernel_init=self.kernel_init, name="Conv_8")(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.final_bn:
      x = _batch_norm(train, axis_name=self.final_bn_axis_name, name="FinalBN")(x)
    return x

  @property
  def layer_names(self) -> list[str]:
    return [f"Conv_{i}" for i in range(9)]

  def rescaling_graph(self, params) -> RescalingGraph:
    _require_plain(self)
    return chain_graph(params, self.layer_names)


class BasicBlockC(nn.Module):
  """A ResNet basic block with a learned 1x1 shortcut (type C), always present."""

  features: int
  strides: int = 1
  use_bias: bool = True
  norm: str = "none"
  gn_groups: int = 32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), strides=(s, s), padding="SAME" if k > 1 else "VALID",
        use_bias=self.use_bias, kernel_init=kaiming, name=name)
    norm = lambda name: _Norm(self.norm, self.gn_groups, self.bn_axis_name, name=name)
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(norm("norm1")(y, train))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = norm("norm2")(y, train)
    shortcut = conv(self.features, 1, self.strides, "shortcut")(x)
    shortcut = norm("norm_shortcut")(shortcut, train)
    return nn.relu(y + shortcut)


class ResNet18C(nn.Module):
  """ResNet-18 whose every block has a learned 1x1 shortcut (the paper's type C).

  ``stem='imagenet'``: conv 7x7/2 and max-pool 3x3/2; ``stem='cifar'``: conv 3x3/1.
  """

  num_classes: int = 1000
  stem: str = "imagenet"
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  use_bias: bool = True
  norm: str = "none"
  gn_groups: int = 32
  final_bn: bool = False
  bn_axis_name: str | None = None
  final_bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
    big = self.stem == "imagenet"
    x = nn.Conv(self.widths[0], (7, 7) if big else (3, 3), strides=(2, 2) if big else (1, 1),
                padding=((3, 3), (3, 3)) if big else "SAME", use_bias=self.use_bias,
                kernel_init=kaiming, name="stem")(x)
    x = nn.relu(_Norm(self.norm, self.gn_groups, self.bn_axis_name, name="stem_norm")(x, train))
    if big:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for name, features, strides in self._blocks():
      x = BasicBlockC(features, strides, self.use_bias, self.norm, self.gn_groups,
                      self.bn_axis_name, name=name)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=xavier, name="head")(x)
    if self.final_bn:
      x = _batch_norm(train, axis_name=self.final_bn_axis_name, name="FinalBN")(x)
    return x

  def _blocks(self) -> list[tuple[str, int, int]]:
    blocks = []
    for stage, (n, features) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        strides = 2 if stage > 0 and j == 0 else 1
        blocks.append((f"stage{stage}_block{j}", features, strides))
    return blocks

  def rescaling_graph(self, params) -> RescalingGraph:
    """Groups: the stem output, and per block its middle and its output channels.

    A block output is produced by both ``conv2`` and ``shortcut`` and consumed
    by the next block's ``conv1`` and ``shortcut`` (or by ``head`` after the
    global average pool): one group with two producers and two consumers.
    """
    _require_plain(self)

    def producer(path):
      bias = f"{path}/bias" if self.use_bias else None
      return Entry(f"{path}/kernel", axis=-1, bias=bias)

    def consumers_of(name):
      if name is None:
        return (Entry("head/kernel", axis=0),)
      return (Entry(f"{name}/conv1/kernel", axis=2), Entry(f"{name}/shortcut/kernel", axis=2))

    blocks = self._blocks()
    names = [b[0] for b in blocks] + [None]
    groups = [Group(self.widths[0], (producer("stem"),), consumers_of(names[0]),
                    name="stem outputs")]
    for (name, features, _), nxt in zip(blocks, names[1:]):
      groups.append(Group(features, (producer(f"{name}/conv1"),),
                          (Entry(f"{name}/conv2/kernel", axis=2),), name=f"{name} middle"))
      groups.append(Group(features, (producer(f"{name}/conv2"), producer(f"{name}/shortcut")),
                          consumers_of(nxt), name=f"{name} outputs"))
    graph = RescalingGraph(tuple(groups))
    graph.validate(params)
    return graph
