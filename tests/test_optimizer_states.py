"""Optimizer states of optax and optax.contrib are rescaled by their meaning.

Reference: the same optimizer started (and, where the math is exact, stepped) on
the balanced network. A parameter copy is multiplied by s, a first moment divided
by s, a second moment by s**2.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import optax.contrib
import pytest

import enorm_jax

MODEL = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(5), nn.relu, nn.Dense(2)])
X = jax.random.normal(jax.random.key(1), (8, 3))


def _setup():
  params = MODEL.init(jax.random.key(0), X)["params"]
  graph = enorm_jax.chain_graph(params, ["layers_0", "layers_2", "layers_4"])
  balanced, scales = enorm_jax.balance(params, graph, c=1.2, cycles=4)
  return params, graph, balanced, scales


def _grads(params):
  return jax.grad(lambda p: jnp.sum(MODEL.apply({"params": p}, X) ** 2))(params)


def _params_shaped(tx, state):
  """Only the params-shaped buffers (the rest does not follow the params)."""
  return optax.tree_utils.tree_map_params(tx, lambda v: v, state,
                                          transform_non_params=lambda _: None)


# Optimizers whose params-shaped state after init is a copy of the params.
STARTS_FROM_PARAMS = {
    "schedule_free_sgd": lambda: optax.contrib.schedule_free_sgd(0.1),
    "prodigy": lambda: optax.contrib.prodigy(),
    "dog": lambda: optax.contrib.dog(),
    "dowg": lambda: optax.contrib.dowg(),
    "mechanize": lambda: optax.contrib.mechanize(optax.sgd(0.1)),
    "madgrad": lambda: optax.contrib.madgrad(0.1),
}
# Optimizers whose state after one step holds only (powers of) gradients, so the
# rescaled state equals the state stepped at the balanced params exactly.
MOMENTS_ONLY = {
    "adam": lambda: optax.adam(1e-2),
    "amsgrad": lambda: optax.amsgrad(1e-2),
    "ademamix": lambda: optax.contrib.ademamix(1e-2),
    "simplified_ademamix": lambda: optax.contrib.simplified_ademamix(1e-2),
    "adafactor_unfactored": lambda: optax.adafactor(1e-2, factored=False),
    "prodigy_moments": lambda: optax.contrib.prodigy(),
}


@pytest.mark.parametrize("name", sorted(STARTS_FROM_PARAMS))
def test_parameter_copies_are_multiplied(name):
  params, graph, balanced, scales = _setup()
  tx = STARTS_FROM_PARAMS[name]()
  rescaled = enorm_jax.rescale_optimizer_state(tx, tx.init(params), params, scales, graph)
  chex.assert_trees_all_close(_params_shaped(tx, rescaled),
                              _params_shaped(tx, tx.init(balanced)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MOMENTS_ONLY))
def test_moments_after_a_step_are_divided(name):
  params, graph, balanced, scales = _setup()
  tx = MOMENTS_ONLY[name]()
  _, state = tx.update(_grads(params), tx.init(params), params)
  _, reference = tx.update(_grads(balanced), tx.init(balanced), balanced)
  rescaled = enorm_jax.rescale_optimizer_state(tx, state, params, scales, graph)
  chex.assert_trees_all_close(_params_shaped(tx, rescaled), _params_shaped(tx, reference),
                              rtol=2e-4, atol=1e-7)


def test_factored_adafactor_raises_with_the_alternative():
  params, graph, _, scales = _setup()
  big = {"layers_0": {"kernel": jnp.ones((200, 300)), "bias": jnp.zeros(300)},
         "layers_2": {"kernel": jnp.ones((300, 2)), "bias": jnp.zeros(2)}}
  big_graph = enorm_jax.chain_graph(big, ["layers_0", "layers_2"])
  tx = optax.adafactor(1e-2)
  with pytest.raises(ValueError, match=r"factored second moment 'v_(row|col)'.*factored=False"):
    enorm_jax.rescale_optimizer_state(tx, tx.init(big), big, (jnp.ones(300),), big_graph)
  # Small kernels are not factored: their placeholders are left alone.
  tx = optax.adafactor(1e-2)
  enorm_jax.rescale_optimizer_state(tx, tx.init(params), params, scales, graph)


class _Custom:
  """A transformation whose state field of an unknown name holds a copy of the params,
  the last gradients or their squares."""

  @staticmethod
  def make(field, holds):
    from typing import NamedTuple
    State = NamedTuple("State", [(field, optax.Params)])
    value = {"params": lambda g, p: p, "grads": lambda g, p: g,
             "squares": lambda g, p: g * g}[holds]
    return optax.GradientTransformation(
        lambda p: State(jax.tree.map(jnp.zeros_like, p)),
        lambda u, s, p=None: (u, State(jax.tree.map(value, u, p))))


@pytest.mark.parametrize("field, holds, role", [("anchor", "params", "PARAM_COPY"),
                                                ("velocity", "grads", "FIRST_MOMENT"),
                                                ("velocity", "squares", "SECOND_MOMENT"),
                                                ("grad_sq_ema", "params", "PARAM_COPY")])
def test_unknown_fields_get_the_role_measured_on_a_probe_step(field, holds, role):
  """The hint comes from what the field holds, not from its name."""
  params, graph, _, scales = _setup()
  tx = _Custom.make(field, holds)
  _, state = tx.update(_grads(params), tx.init(params), params)
  with pytest.raises(ValueError, match=rf"state_roles=\{{'{field}': enorm_jax.{role}\}}"):
    enorm_jax.rescale_optimizer_state(tx, state, params, scales, graph)
