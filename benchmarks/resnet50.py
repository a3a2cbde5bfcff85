"""A standard ResNet-50 (identity shortcuts, BatchNorm), for the tracer benchmarks."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Bottleneck(nn.Module):
  """A standard ResNet-50 bottleneck block with BatchNorm and an identity shortcut
  (a projection only where the shape changes)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(bn()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(self.features, (3, 3), (self.strides, self.strides),
                             use_bias=False)(y)))
    y = bn()(nn.Conv(self.features * 4, (1, 1), use_bias=False)(y))
    if x.shape[-1] != self.features * 4 or self.strides != 1:
      x = bn()(nn.Conv(self.features * 4, (1, 1), (self.strides, self.strides),
                       use_bias=False)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """Standard ResNet-50 (identity shortcuts, BatchNorm), for the tracer benchmarks."""

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = Bottleneck(64 * 2 ** i, 2 if i > 0 and j == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
