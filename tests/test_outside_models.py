"""Models written the way public Flax code writes them: traced, checked, balanced.

The definitions follow the conventions of the Flax examples (``functools.partial``
module factories, ``ModuleDef`` attributes, ``use_running_average``, dropout with
``deterministic``) but are written here.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

ModuleDef = Any
KEY = jax.random.key(0)


class ResidualUnit(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    shortcut = x
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.ones)(self.conv(self.filters, (3, 3))(y))
    if shortcut.shape != y.shape:
      shortcut = self.norm(name="norm_proj")(
          self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
    return self.act(shortcut + y)


class SmallResNet(nn.Module):
  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResidualUnit(self.num_filters * 2**i, conv, norm, nn.relu, strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    x = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform())(inputs)
    x = nn.relu(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    out = nn.Dense(inputs.shape[-1], kernel_init=nn.initializers.xavier_uniform())(x)
    return nn.Dropout(rate=self.dropout_rate)(out, deterministic=deterministic)


class EncoderLayer(nn.Module):
  num_heads: int = 2
  mlp_dim: int = 16

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    x = nn.LayerNorm()(inputs)
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
        x, x, deterministic=deterministic)
    x = x + inputs
    y = nn.LayerNorm()(x)
    return x + MlpBlock(self.mlp_dim)(y, deterministic=deterministic)


def _trace_check_balance(apply, variables, x, min_units):
  graph = enorm_jax.trace_graph(apply, variables, x[:1])
  assert graph.num_units >= min_units
  enorm_jax.check_graph(apply, variables, graph, x)
  balanced, _ = enorm_jax.balance(variables, graph, c=1.2, cycles=3)
  np.testing.assert_allclose(apply(balanced, x), apply(variables, x), rtol=2e-5, atol=2e-6)
  return graph


@pytest.mark.slow  # test_trace's identity ResNet with eval BatchNorm covers the mechanism
def test_resnet_with_eval_batchnorm():
  model = SmallResNet()
  x = jax.random.normal(KEY, (4, 16, 16, 3))
  variables = model.init(KEY, x, train=False)
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.uniform(KEY, v.shape), variables)
  apply = lambda v, x: model.apply(v, x, train=False)
  graph = _trace_check_balance(apply, variables, x, min_units=8 * 3 + 16 * 3)
  assert any(g.carried for g in graph)  # running means move with their units


def test_transformer_encoder_layer_mlp_block_and_values():
  model = EncoderLayer()
  x = jax.random.normal(KEY, (3, 7, 8))
  params = model.init(KEY, x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  graph = _trace_check_balance(apply, params, x, min_units=16 + 8)
  producers = {g.producers[0].path for g in graph}
  assert "MlpBlock_0/Dense_0/kernel" in producers
  assert "MultiHeadDotProductAttention_0/value/kernel" in producers
