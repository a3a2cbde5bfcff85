"""The `enorm` optax wrapper against hand-written references of Algorithm 2."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import enorm_jax
from tests import reference
from tests.chains import mlp_apply, mlp_graph, mlp_params

WIDTHS = [6, 8, 8, 3]
LR, MOMENTUM, WD = 0.05, 0.9, 1e-3


def data(seed=0, n=32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, WIDTHS[0])), jax.random.normal(ky, (n, WIDTHS[-1]))


def loss_fn(params, x, y):
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


def split(params):
  n = len(params)
  return ([np.asarray(params[f"Dense_{k}"]["kernel"], np.float64) for k in range(n)],
          [np.asarray(params[f"Dense_{k}"]["bias"], np.float64) for k in range(n)])


def join(kernels, biases):
  return {f"Dense_{k}": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
          for k, (w, b) in enumerate(zip(kernels, biases))}


def run_enorm(tx, params, steps, x, y):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_sgd_momentum_matches_algorithm2_reference(c):
  """20 steps of enorm(chain(add_decayed_weights, sgd(momentum))) vs a numpy loop."""
  params = mlp_params(WIDTHS, seed=1, spread=0.5)
  graph = mlp_graph(params)
  x, y = data()
  inner = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
  got, _ = run_enorm(enorm_jax.enorm(inner, graph, c=c), params, 20, x, y)

  ws, bs = split(params)
  mws, mbs = [np.zeros_like(w) for w in ws], [np.zeros_like(b) for b in bs]
  for _ in range(20):
    grads = jax.grad(loss_fn)(join(ws, bs), x, y)
    gws, gbs = split(grads)
    for k in range(len(ws)):  # SGD step: weight decay, then heavy-ball momentum
      mws[k] = MOMENTUM * mws[k] + gws[k] + WD * ws[k]
      mbs[k] = MOMENTUM * mbs[k] + gbs[k] + WD * bs[k]
      ws[k], bs[k] = ws[k] - LR * mws[k], bs[k] - LR * mbs[k]
    ws, bs, [(mws, mbs, _)] = reference.balance_chain(ws, bs, c=c, buffers=[(mws, mbs, -1)])
  chex.assert_trees_all_close(got, join(ws, bs), rtol=1e-4, atol=1e-6)


def test_adam_moments_match_reference():
  params = mlp_params(WIDTHS, seed=2, spread=0.5)
  graph = mlp_graph(params)
  x, y = data(1)
  lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
  got, _ = run_enorm(enorm_jax.enorm(optax.adam(lr, b1, b2, eps), graph), params, 20, x, y)

  ws, bs = split(params)
  mu = ([np.zeros_like(w) for w in ws], [np.zeros_like(b) for b in bs])
  nu = ([np.zeros_like(w) for w in ws], [np.zeros_like(b) for b in bs])
  for t in range(1, 21):
    gws, gbs = split(jax.grad(loss_fn)(join(ws, bs), x, y))
    for tree, grad in ((0, gws), (1, gbs)):
      for k in range(len(ws)):
        mu[tree][k] = b1 * mu[tree][k] + (1 - b1) * grad[k]
        nu[tree][k] = b2 * nu[tree][k] + (1 - b2) * grad[k] ** 2
        step = lr * (mu[tree][k] / (1 - b1 ** t)) / (np.sqrt(nu[tree][k] / (1 - b2 ** t)) + eps)
        if tree == 0:
          ws[k] = ws[k] - step
        else:
          bs[k] = bs[k] - step
    ws, bs, bufs = reference.balance_chain(ws, bs, buffers=[(*mu, -1), (*nu, -2)])
    mu, nu = bufs[0][:2], bufs[1][:2]
  chex.assert_trees_all_close(got, join(ws, bs), rtol=2e-4, atol=1e-6)


def test_rescaled_momentum_equals_gradient_at_balanced_params():
  """eq. (10): on a loss of the network function, grad at W' = D grad at W, elementwise."""
  params = mlp_params(WIDTHS, seed=3, spread=1.0)
  graph = mlp_graph(params)
  x, y = data(2)
  balanced, scales = enorm_jax.balance(params, graph, cycles=3)
  grads = jax.grad(loss_fn)(params, x, y)
  grads_at_balanced = jax.grad(loss_fn)(balanced, x, y)
  chex.assert_trees_all_close(enorm_jax.rescale(grads, scales, graph, power=enorm_jax.FIRST_MOMENT),
                              grads_at_balanced, rtol=1e-4, atol=1e-7)


INNER = {
    "chain_sgd": lambda: optax.chain(optax.add_decayed_weights(WD),
                                     optax.sgd(optax.linear_schedule(LR, 0.0, 100), MOMENTUM)),
    "adam": lambda: optax.adam(1e-2),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=LR,
                                                                       momentum=MOMENTUM),
    "multisteps_inner": lambda: optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), 2),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.sgd(LR, momentum=MOMENTUM), 3),
    "masked": lambda: optax.chain(
        optax.masked(optax.add_decayed_weights(WD),
                     lambda p: jax.tree.map(lambda v: v.ndim > 1, p)),
        optax.sgd(LR, momentum=MOMENTUM)),
    "masked_sgd": lambda: optax.masked(
        optax.sgd(LR, momentum=MOMENTUM), lambda p: jax.tree.map(lambda v: v.ndim > 1, p)),
}


@pytest.mark.parametrize("name", sorted(INNER))
@pytest.mark.parametrize("every_k", [1, 3])
def test_wrapped_optimizers_train_and_stay_balanced(name, every_k):
  params = mlp_params(WIDTHS, seed=4, spread=0.5)
  graph = mlp_graph(params)
  x, y = data(3)
  tx = enorm_jax.enorm(INNER[name](), graph, every_k=every_k)
  # init must work with tree_map_params (it is called with a placeholder).
  state = tx.init(params)
  optax.tree_utils.tree_map_params(tx, lambda v: v, state)
  out, state = run_enorm(tx, params, 6, x, y)
  assert int(state.enorm_count) == 6
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  if name != "masked_sgd":  # optax.masked passes masked-out gradients through raw
    assert float(loss_fn(out, x, y)) < float(loss_fn(params, x, y))
  # After a balancing step the params are (close to) a fixed point of one more cycle.
  if every_k == 1:
    again, scales = enorm_jax.balance(out, graph)
    assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in scales) < 0.5


def test_multisteps_outside_enorm():
  params = mlp_params(WIDTHS, seed=5)
  graph = mlp_graph(params)
  x, y = data(4)
  tx = optax.MultiSteps(enorm_jax.enorm(optax.sgd(LR, momentum=MOMENTUM), graph), 2)
  out, _ = run_enorm(tx, params, 4, x, y)
  assert float(loss_fn(out, x, y)) < float(loss_fn(params, x, y))


def test_every_k_balances_only_on_multiples():
  params = mlp_params(WIDTHS, seed=6, spread=1.0)
  graph = mlp_graph(params)
  x, y = data(5)
  sgd = optax.sgd(LR)
  tx = enorm_jax.enorm(sgd, graph, every_k=2)
  plain, _ = run_enorm(sgd, params, 1, x, y)
  one, _ = run_enorm(tx, params, 1, x, y)
  chex.assert_trees_all_close(one, plain, rtol=1e-6)  # step 1: no balancing
  two_plain, _ = run_enorm(sgd, params, 2, x, y)
  two, _ = run_enorm(tx, params, 2, x, y)
  chex.assert_trees_all_close(two, enorm_jax.balance(two_plain, graph)[0], rtol=1e-4, atol=1e-6)


def test_flax_train_state_apply_gradients():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(3)])
  x, y = data(6)
  params = model.init(jax.random.key(0), x)["params"]
  graph = enorm_jax.chain_graph(params, ["layers_0", "layers_2", "layers_4"])
  tx = enorm_jax.enorm(optax.sgd(LR, momentum=MOMENTUM), graph)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(
        state.params)
    return state.apply_gradients(grads=grads)

  start = float(enorm_jax.energy(state.params, graph))
  for _ in range(5):
    state = step(state)
  assert float(enorm_jax.energy(state.params, graph)) < start


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(WIDTHS[0], 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, WIDTHS[-1], rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


def test_nnx_optimizer():
  model = NnxMLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  graph = enorm_jax.chain_graph(params, ["fc1", "fc2"])
  x, y = data(7)
  optimizer = nnx.Optimizer(model, enorm_jax.enorm(optax.sgd(LR, momentum=MOMENTUM), graph),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  y0 = model(x)
  start = float(enorm_jax.energy(nnx.state(model, nnx.Param), graph))
  for _ in range(3):
    step(model, optimizer)
  assert float(enorm_jax.energy(nnx.state(model, nnx.Param), graph)) < start
  assert not np.allclose(model(x), y0)


def test_no_recompilation_across_steps():
  params = mlp_params(WIDTHS, seed=8)
  graph = mlp_graph(params)
  x, y = data(8)
  tx = enorm_jax.enorm(optax.chain(optax.add_decayed_weights(WD),
                                   optax.sgd(LR, momentum=MOMENTUM)), graph)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss_fn)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  # A graph built again the same way is equal and hashes the same: no new trace.
  assert mlp_graph(params) == graph and hash(mlp_graph(params)) == hash(graph)
  assert len(traces) == 1


def test_unknown_state_field_raises():
  params = mlp_params(WIDTHS, seed=9)
  graph = mlp_graph(params)

  def init(params):
    return {"velocity": jax.tree.map(jnp.zeros_like, params)}

  def update(updates, state, params=None):
    return updates, state

  tx = enorm_jax.enorm(optax.GradientTransformation(init, update), graph)
  state = tx.init(params)
  with pytest.raises(ValueError, match="velocity.*state_roles"):
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  # The fix the message suggests works.
  tx = enorm_jax.enorm(optax.GradientTransformation(init, update), graph,
                       state_roles={"velocity": enorm_jax.FIRST_MOMENT})
  tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=-1.0), "p must be"), (dict(c=0.0), "c must be"), (dict(cycles=0), "cycles"),
    (dict(every_k=0), "every_k")])
def test_bad_arguments_raise_at_build_time(kwargs, match):
  params = mlp_params(WIDTHS)
  with pytest.raises(ValueError, match=match):
    enorm_jax.enorm(optax.sgd(0.1), mlp_graph(params), **kwargs)


def test_update_without_params_raises():
  params = mlp_params(WIDTHS)
  tx = enorm_jax.enorm(optax.sgd(0.1), mlp_graph(params))
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params))
