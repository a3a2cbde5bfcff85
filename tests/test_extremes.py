"""Extreme magnitudes and non-finite values."""

import chex
import jax
import jax.numpy as jnp
import optax

import enorm_jax
from tests.chains import mlp_apply, mlp_graph, mlp_params, relative_error


def test_weights_from_1e_minus30_to_1e30_balance_in_float32():
  params = mlp_params([6, 5, 5, 5, 4], seed=11, bias=False)
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"] * 1e-30
  params["Dense_3"]["kernel"] = params["Dense_3"]["kernel"] * 1e30
  graph = mlp_graph(params)
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = mlp_apply(params, x)
  assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.max(jnp.abs(y))) > 0
  out, scales = jax.jit(lambda p: enorm_jax.balance(p, graph, cycles=30))(params)
  assert all(bool(jnp.all(jnp.isfinite(s) & (s > 0))) for s in scales)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  norms = [float(jnp.linalg.norm(out[f"Dense_{k}"]["kernel"])) for k in range(4)]
  assert max(norms) / min(norms) < 10.0, norms
  assert relative_error(mlp_apply(out, x), y) < 1e-4


def test_inf_weight_freezes_only_its_units():
  params = mlp_params([5, 4, 4, 3], seed=12, spread=1.0)
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[2, 1].set(jnp.inf)
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph)
  assert float(scales[0][2]) == 1.0 and float(scales[1][1]) == 1.0
  assert bool(jnp.all(jnp.isfinite(scales[0]))) and bool(jnp.all(jnp.isfinite(scales[1])))
  assert bool(jnp.any(scales[0] != 1.0)) and bool(jnp.any(scales[1] != 1.0))
  assert int(jnp.isinf(out["Dense_1"]["kernel"]).sum()) == 1
  assert not any(bool(jnp.any(jnp.isnan(v))) for v in jax.tree.leaves(out))


def test_apply_if_finite_refuses_non_finite_updates():
  params = mlp_params([5, 4, 3], seed=13, spread=1.0)
  graph = mlp_graph(params)
  tx = optax.apply_if_finite(enorm_jax.enorm(optax.sgd(0.1, momentum=0.9), graph), 3)
  state = tx.init(params)
  bad = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), params)
  updates, state = tx.update(bad, state, params)
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  assert int(state.notfinite_count) == 1
  good = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(good, state, params)
  assert int(state.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
