"""ENorm on 8 simulated CPU devices: replicated and FSDP-sharded params."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import enorm_jax
from tests.chains import mlp_graph, mlp_params

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all", "collective-broadcast")

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture
def mesh():
  return Mesh(np.asarray(jax.devices()[:8]), ("x",))


def setup_chain():
  params = mlp_params([16, 32, 32, 16, 8], seed=0, spread=1.0)
  return params, mlp_graph(params)


def fsdp_sharding(params, mesh, dim):
  """Kernels split along ``dim`` (0: input rows, 1: output columns), biases replicated."""
  def spec(x):
    if x.ndim == 2:
      return NamedSharding(mesh, P("x", None) if dim == 0 else P(None, "x"))
    return NamedSharding(mesh, P())
  return jax.tree.map(spec, params)


def balanced_on(params, graph, shardings):
  fn = jax.jit(lambda p: enorm_jax.balance(p, graph, cycles=3), in_shardings=(shardings,),
               out_shardings=(shardings, None))
  return fn, fn(jax.device_put(params, shardings))


def test_replicated_matches_single_device_without_collectives(mesh):
  params, graph = setup_chain()
  expected, expected_scales = enorm_jax.balance(params, graph, cycles=3)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  fn, (out, scales) = balanced_on(params, graph, shardings)
  chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(scales, expected_scales, rtol=1e-6)
  hlo = fn.lower(jax.device_put(params, shardings)).compile().as_text()
  found = [c for c in COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo)]
  assert not found, f"replicated ENorm compiled to collectives: {found}"


@pytest.mark.parametrize("dim", [0, 1])
def test_fsdp_sharded_matches_single_device(mesh, dim):
  params, graph = setup_chain()
  expected, _ = enorm_jax.balance(params, graph, cycles=3)
  shardings = fsdp_sharding(params, mesh, dim)
  fn, (out, _) = balanced_on(params, graph, shardings)
  chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-7)
  # Sharded norms do need a reduction across devices: the collective detector sees it.
  hlo = fn.lower(jax.device_put(params, shardings)).compile().as_text()
  assert any(re.search(rf"\b{c}(-start)?\(", hlo) for c in COLLECTIVES)
  assert out["Dense_1"]["kernel"].sharding.is_equivalent_to(shardings["Dense_1"]["kernel"], 2)


@pytest.mark.parametrize("dim", [pytest.param(None, marks=pytest.mark.slow), 0, 1])
def test_enorm_step_matches_single_device(mesh, dim):
  params, graph = setup_chain()
  tx = enorm_jax.enorm(optax.chain(optax.add_decayed_weights(1e-3),
                                   optax.sgd(0.1, momentum=0.9)), graph)
  grads = jax.tree.map(lambda v: jnp.cos(v * 3.0), params)

  def step(params, grads):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  expected = jax.jit(step)(params, grads)
  shardings = (jax.tree.map(lambda _: NamedSharding(mesh, P()), params) if dim is None
               else fsdp_sharding(params, mesh, dim))
  put = lambda t: jax.device_put(t, shardings)
  out = jax.jit(step, in_shardings=(shardings, shardings))(put(params), put(grads))
  chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-7)
