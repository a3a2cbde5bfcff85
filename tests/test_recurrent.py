"""Recurrent units: ``h_t = relu(x_t wx + h_{t-1} wh + b)``. Unit k multiplies
column k of ``wx`` and ``wh`` and ``b[k]``, and divides row k of ``wh`` and of
every reader of ``h``: ``wh[i, k]`` moves by ``d[k] / d[i]`` and its diagonal
stays. The tracer finds these units through `lax.scan` and `nn.RNN`; `balance`
takes each unit's exact minimiser in turn (the units share ``wh``), and reaches
the minimum a general-purpose solver finds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import enorm_jax

H = 32


def _rnn_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"wx": jax.random.normal(k[0], (4, H)) * 0.5,
          "wh": jax.random.normal(k[1], (H, H)) * 0.2,
          "b": jax.random.normal(k[2], (H,)) * 0.1,
          "wo": jax.random.normal(k[3], (H, 3))}


def rnn(p, xs):
  def step(h, x):
    return jax.nn.relu(x @ p["wx"] + h @ p["wh"] + p["b"]), None
  h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], H)), xs)
  return h @ p["wo"]


XS = jax.random.normal(jax.random.key(9), (6, 2, 4))


def _energy_at(params, log_d):
  """The energy after rescaling by exp(log_d), written out (float64)."""
  d = np.exp(log_d)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  return (np.sum((p["wx"] * d) ** 2) + np.sum((p["wh"] * d[None] / d[:, None]) ** 2)
          + np.sum((p["wo"] / d[:, None]) ** 2))


def test_the_recurrent_units_are_traced_and_rescale_exactly():
  params = _rnn_params()
  graph = enorm_jax.trace_graph(rnn, params, XS)
  (group,) = graph.groups
  assert group.size == H
  assert [(e.path, e.axis) for e in group.producers] == [("wx", 1), ("wh", 1)]
  assert [(e.path, e.axis) for e in group.consumers] == [("wh", 0), ("wo", 0)]
  assert [e.path for e in group.biases] == ["b"]
  d = np.exp(np.random.default_rng(0).normal(size=H)).astype(np.float32)
  moved = {"wx": params["wx"] * d, "wh": params["wh"] * d[None] / d[:, None],
           "b": params["b"] * d, "wo": params["wo"] / d[:, None]}
  np.testing.assert_allclose(rnn(moved, XS), rnn(params, XS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_balance_reaches_the_minimum_of_an_independent_solver(seed):
  params = _rnn_params(seed)
  graph = enorm_jax.trace_graph(rnn, params, XS)
  energies = [float(enorm_jax.energy(params, graph))]
  balanced, cycle = params, jax.jit(lambda q: enorm_jax.balance(q, graph)[0])
  for _ in range(30):
    balanced = cycle(balanced)
    energies.append(float(enorm_jax.energy(balanced, graph)))
  assert all(b <= a * (1 + 1e-6) for a, b in zip(energies, energies[1:]))  # descent
  reference = scipy.optimize.minimize(lambda x: _energy_at(params, x), np.zeros(H),
                                      method="BFGS", options={"gtol": 1e-10})
  assert energies[-1] == pytest.approx(reference.fun, rel=1e-5)
  assert energies[-1] < 0.99 * energies[0]
  np.testing.assert_allclose(rnn(balanced, XS), rnn(params, XS), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(jnp.diagonal(balanced["wh"]),  # d[k] / d[k], exactly
                                jnp.diagonal(params["wh"]))


def test_flax_rnn_with_a_simple_cell():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, xs):
      h = nn.RNN(nn.SimpleCell(features=16, activation_fn=nn.relu))(xs)
      return nn.Dense(2)(h[:, -1])

  model, xs = Model(), jax.random.normal(jax.random.key(0), (4, 5, 3))
  params = model.init(jax.random.key(1), xs)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  graph = enorm_jax.trace_graph(fn, params, xs)
  assert graph.num_units == 16
  assert {e.path for e in graph.groups[0].consumers} == {"SimpleCell_0/h/kernel",
                                                        "Dense_0/kernel"}
  balanced, _ = enorm_jax.balance(params, graph, cycles=5)
  np.testing.assert_allclose(fn(balanced, xs), fn(params, xs), rtol=1e-4, atol=1e-5)


def test_enorm_keeps_the_function_of_a_recurrent_net():
  params = _rnn_params()
  graph = enorm_jax.trace_graph(rnn, params, XS)
  tx = enorm_jax.enorm(optax.adam(0.0), graph)
  state, p = tx.init(params), params
  grads = jax.grad(lambda q: jnp.sum(rnn(q, XS) ** 2))
  for _ in range(3):
    updates, state = tx.update(grads(p), state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(rnn(p, XS), rnn(params, XS), rtol=1e-4, atol=1e-5)
  assert float(enorm_jax.energy(p, graph)) < float(enorm_jax.energy(params, graph))


def test_bad_recurrent_graphs_raise():
  params = _rnn_params()
  graph = enorm_jax.trace_graph(rnn, params, XS)
  with pytest.raises(ValueError, match="recurrent kernel .'wh'.*use c=1"):
    enorm_jax.balance(params, graph, c=1.2)
  transposed = enorm_jax.RescalingGraph((enorm_jax.Group(
      H, producers=(enorm_jax.Entry("wx", 1), enorm_jax.Entry("wh", 0)),
      consumers=(enorm_jax.Entry("wh", 1), enorm_jax.Entry("wo", 0))),))
  with pytest.raises(ValueError, match="'wh' is both a producer and a consumer"):
    enorm_jax.balance(params, transposed)
