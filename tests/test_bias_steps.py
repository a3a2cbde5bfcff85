"""`enorm(bias_steps='unbalanced')`: biases stepped in the unbalanced coordinates."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import enorm_jax

LAYERS = ["layers_0", "layers_2", "layers_4", "layers_6"]


def _mlp():
  model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(10), nn.relu, nn.Dense(8), nn.relu,
                         nn.Dense(3)])
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  # Non-zero biases, so that their steps and rescaling matter from the first step.
  keys = iter(jax.random.split(jax.random.key(1), 8))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.3 * jax.random.normal(next(keys), x.shape)
      if path[-1].key == "bias" else x, params)
  return model, params, enorm_jax.chain_graph(params, LAYERS)


def _only_biases(inner):
  """``inner`` on the biases; kernels get zero updates (and no state)."""
  return optax.multi_transform({"bias": inner, "kernel": optax.set_to_zero()},
                               lambda p: jax.tree_util.tree_map_with_path(
                                   lambda path, _: path[-1].key, p))


@pytest.mark.parametrize("make_inner", [
    lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9)),
    pytest.param(lambda: optax.adamw(1e-2, weight_decay=1e-2), marks=pytest.mark.slow),
])
def test_unbalanced_bias_steps_follow_the_unbalanced_network(make_inner):
  """With frozen kernels, ENorm only moves the net along its rescaling orbit, so with
  biases stepped in unbalanced coordinates the balanced net must compute the same
  function as the same optimizer run on the never-balanced net, step after step."""
  model, params, graph = _mlp()
  x = jax.random.normal(jax.random.key(2), (16, 6))
  y = jax.random.randint(jax.random.key(3), (16,), 0, 3)

  def loss(p):
    logits = model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def run(tx, steps=6):
    p, state = params, tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  plain = run(_only_biases(make_inner()))
  # frozen=(): the kernels get no steps but are still rescaled.
  unbalanced = run(enorm_jax.enorm(_only_biases(make_inner()), graph, c=1.2,
                                   bias_steps="unbalanced", frozen=()))
  balanced = run(enorm_jax.enorm(_only_biases(make_inner()), graph, c=1.2,
                                 bias_steps="balanced", frozen=()))
  out = lambda p: model.apply({"params": p}, x)
  np.testing.assert_allclose(out(unbalanced), out(plain), rtol=2e-5, atol=2e-5)
  # The paper's steps differ (the test can fail), and the nets did move.
  assert float(jnp.max(jnp.abs(out(balanced) - out(plain)))) > 1e-3
  assert float(jnp.max(jnp.abs(out(plain) - out(params)))) > 1e-2


def test_unbalanced_bias_steps_keep_the_function_and_track_the_factors():
  model, params, graph = _mlp()
  tx = enorm_jax.enorm(optax.sgd(0.0), graph, c=1.2, cycles=3, bias_steps="unbalanced")
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  x = jax.random.normal(jax.random.key(4), (5, 6))
  np.testing.assert_allclose(model.apply({"params": new}, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)
  # The accumulated factor of each unit is its bias's factor: new bias / old bias.
  assert len(state.unit_scales) == len(LAYERS) - 1
  for layer, unit_scale in zip(LAYERS[:-1], state.unit_scales):
    np.testing.assert_allclose(unit_scale, new[layer]["bias"] / params[layer]["bias"],
                               rtol=1e-5)


def test_bias_steps_default_warns_for_c_other_than_one_with_biases():
  _, params, graph = _mlp()
  with pytest.warns(UserWarning, match="bias_steps='unbalanced'"):
    enorm_jax.enorm(optax.sgd(0.1), graph, c=1.2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    enorm_jax.enorm(optax.sgd(0.1), graph, c=1.0)
    enorm_jax.enorm(optax.sgd(0.1), graph, c=1.2, bias_steps="balanced")
  with pytest.raises(ValueError, match="bias_steps must be one of"):
    enorm_jax.enorm(optax.sgd(0.1), graph, bias_steps="frame")


def test_state_is_tree_map_params_friendly():
  """init reads only the graph, so optax.tree_utils.tree_map_params (used for
  sharding specs) works with unbalanced bias steps and the outermost check."""
  _, params, graph = _mlp()
  tx = enorm_jax.enorm(optax.adam(1e-3), graph, c=1.2, bias_steps="unbalanced")
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(tx, lambda v: v + 1, state,
                                            transform_non_params=lambda v: v)
  np.testing.assert_allclose(mapped.inner_state[0].mu["layers_0"]["kernel"], 1.0)
  assert len(mapped.unit_scales) == len(state.unit_scales)
