"""The README's NNX recipes, for models with and without BatchNorm, eval and train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import enorm_jax


class CNN(nnx.Module):
  def __init__(self, rngs, batch_norm=True):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs) if batch_norm else None
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = self.conv1(x)
    if self.bn1 is not None:
      x = self.bn1(x)
    x = nnx.relu(self.conv2(nnx.relu(x)))
    return self.fc(x.mean((1, 2)))


X = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))


def _trained_stats(model):
  model.train()
  for i in range(3):  # non-trivial running statistics
    model(X + i)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_eval_recipe_balances_the_whole_state(batch_norm):
  model = CNN(nnx.Rngs(0), batch_norm)
  _trained_stats(model)
  model.eval()
  expected = model(X)
  graphdef, state = nnx.split(model)
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  graph = enorm_jax.trace_graph(apply, state, X[:1])
  assert graph.num_units == 3 * 8 if batch_norm else 2 * 8  # conv1 (with its BN), BN, conv2
  enorm_jax.check_graph(apply, state, graph, X)
  balanced, _ = enorm_jax.balance(state, graph, c=1.2, cycles=3)
  nnx.update(model, balanced)
  np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_train_recipe_trains_the_params_with_nnx_optimizer(batch_norm):
  model = CNN(nnx.Rngs(0), batch_norm)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # copy=True: the model built inside the trace owns its batch statistics.
  apply = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)
  graph = enorm_jax.trace_graph(apply, params, X[:1])
  assert graph.num_units == 2 * 8  # units feeding the train-mode BN are left out
  enorm_jax.check_graph(apply, params, graph, X)
  optimizer = nnx.Optimizer(model, enorm_jax.enorm(optax.adam(1e-2), graph), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
  for _ in range(3):
    step(model, optimizer, X)
  # The params stay balanced: one more balance changes them little.
  params = nnx.state(model, nnx.Param)
  again, scales = enorm_jax.balance(params, graph)
  assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in scales) < 0.05


def test_eval_graph_used_on_params_only_explains_the_train_recipe():
  model = CNN(nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  graph = enorm_jax.trace_graph(lambda s, x: nnx.merge(graphdef, s)(x), state, X[:1])
  params = nnx.state(model, nnx.Param)
  tx = enorm_jax.enorm(optax.sgd(0.1), graph)
  with pytest.raises(ValueError, match="BatchNorm running statistic.*train mode"):
    tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  with pytest.raises(ValueError, match="BatchNorm running statistic.*train mode"):
    enorm_jax.balance(params, graph)
