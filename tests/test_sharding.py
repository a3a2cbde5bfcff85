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


def test_a_state_saved_on_one_device_passes_the_check_on_a_sharded_mesh(mesh):
  """Resuming on another mesh reorders the fingerprints' sums: they must stay accurate
  far below the check's tolerance (a float32 dot over 4M elements on XLA:CPU was off
  by 4e-3)."""
  params = mlp_params([16, 4096, 512, 8], seed=0)
  graph = mlp_graph(params)
  tx = enorm_jax.enorm(optax.sgd(1e-3), graph, check_applied="record")
  grads = jax.tree.map(lambda v: jnp.cos(v * 3.0), params)

  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = jax.jit(step)(params, tx.init(params))  # saved on one device
  shardings = fsdp_sharding(params, mesh, 0)
  resumed = jax.jit(step, in_shardings=(shardings, None))
  new_params, new_state = resumed(jax.device_put(params, shardings), state)
  assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params))
  enorm_jax.raise_if_misapplied(new_state, graph)
  # Each rescaled leaf's [sum, sum of squares] against a float64 reference.
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(new_params)]
  reference = np.array([[x.sum(), x @ x] for x in leaves])
  got = np.asarray(new_state.applied)
  assert len(got) == len(leaves) - 1  # the last bias has no group
  assert all(np.isclose(row, reference, rtol=1e-6, atol=0).all(1).any() for row in got), got
