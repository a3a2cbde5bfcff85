"""Layers stacked on a leading axis with `nn.scan` (the MaxText idiom), with and
without `nn.remat`, and with `nnx.vmap` + `nnx.scan`: each layer's units are its
own, in the group structure of the unrolled model, with entries ranging over the
layer axis."""

import flax.linen as nn
from flax import nnx
import jax
import numpy as np
import pytest

import enorm_jax

D, F, LAYERS = 16, 32, 3


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(name="norm")(x)
    h = nn.Dense(D, use_bias=False, name="down")(
        nn.relu(nn.Dense(F, use_bias=False, name="up")(h)))
    return x + h, None


class Stack(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    block = nn.remat(Block) if self.remat else Block
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=LAYERS)(name="layers")(x, None)
    return nn.Dense(4, name="head")(nn.RMSNorm(name="final")(x))


@pytest.mark.parametrize("remat", [False, True])
def test_stacked_layers_give_the_unrolled_groups(remat):
  model, x = Stack(remat), jax.random.normal(jax.random.key(1), (4, 6))
  params = model.init(jax.random.key(0), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  graph = enorm_jax.trace_graph(fn, params, x)
  by_anchor = {g.producers[0].path: g for g in graph}
  norm, mlp = by_anchor["layers/norm/scale"], by_anchor["layers/up/kernel"]
  assert (norm.size, mlp.size) == (LAYERS * D, LAYERS * F)
  assert [(e.path, e.axis) for e in mlp.producers + mlp.consumers] == [
      ("layers/up/kernel", (0, 2)), ("layers/down/kernel", (0, 1))]
  assert graph.num_units == LAYERS * (D + F) + D  # plus the final norm
  # By hand: layer l's hidden unit j, up column times d[l, j], down row divided.
  d = np.exp(np.random.default_rng(0).normal(size=(LAYERS, F))).astype(np.float32)
  moved = jax.tree.map(lambda a: a, params)
  moved["layers"]["up"]["kernel"] = params["layers"]["up"]["kernel"] * d[:, None, :]
  moved["layers"]["down"]["kernel"] = params["layers"]["down"]["kernel"] / d[:, :, None]
  np.testing.assert_allclose(fn(moved, x), fn(params, x), rtol=1e-5, atol=1e-5)
  balanced, _ = enorm_jax.balance(params, graph, cycles=5)
  np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)
  # Each layer is balanced on its own: the factors differ from layer to layer.
  ratio = balanced["layers"]["up"]["kernel"] / params["layers"]["up"]["kernel"]
  assert not np.allclose(ratio[0], ratio[1])


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(self.norm(x))))


class NNXStack(nnx.Module):
  """Layers created with `nnx.vmap` and run with `nnx.scan` (the NNX idiom)."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(6, D, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NNXBlock(rngs)
    self.layers = make(rngs)
    self.final = nnx.RMSNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(block, x):
      return block(x)
    return self.head(self.final(step(self.layers, self.inp(x))))


def test_nnx_vmap_and_scan_stacks_give_the_unrolled_groups():
  graphdef, state = nnx.split(NNXStack(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (4, 6))
  graph = enorm_jax.trace_graph(fn, state, x)
  by_anchor = {g.producers[0].path: g for g in graph}
  assert by_anchor["layers/up/kernel"].size == LAYERS * F
  assert by_anchor["layers/norm/scale"].size == LAYERS * D
  assert graph.num_units == LAYERS * (D + F) + D
  balanced, _ = enorm_jax.balance(state, graph, cycles=3)
  np.testing.assert_allclose(fn(balanced, x), fn(state, x), rtol=1e-4, atol=1e-5)
  ratio = balanced["layers"]["up"]["kernel"].value / state["layers"]["up"]["kernel"].value
  assert not np.allclose(ratio[0], ratio[1])
