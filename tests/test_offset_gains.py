"""Offset gains: a norm written ``x_normed * (1 + scale)`` (Gemma) has the gain
``1 + scale``, and rescaling the gain by ``d`` moves the parameter to
``(1 + scale) * d - 1``. Entries carry it as ``Entry.shift``; the tracer finds it
from ``1 + scale``; `balance`, `energy`, `rescale` and `enorm` treat the gain as
the weight, and moments in the optimizer state move as the gain's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import enorm_jax
from enorm_jax import Entry, Group, RescalingGraph

D, F = 8, 16


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"scale": jax.random.normal(k[0], (D,)) * 0.3,
          "up": jax.random.normal(k[1], (D, F)), "down": jax.random.normal(k[2], (F, 3))}


def gemma_mlp(p, x):
  y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + p["scale"])
  return jax.nn.relu(y @ p["up"]) @ p["down"]


X = jax.random.normal(jax.random.key(7), (5, D))
GRAPH = RescalingGraph((
    Group(D, producers=(Entry("scale", 0, shift=1.0),), consumers=(Entry("up", 0),)),
    Group(F, producers=(Entry("up", 1),), consumers=(Entry("down", 0),))))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_balance_minimizes_the_gains_energy(seed):
  params = _params(seed)
  balanced, _ = enorm_jax.balance(params, GRAPH, cycles=50)
  np.testing.assert_allclose(gemma_mlp(balanced, X), gemma_mlp(params, X), rtol=1e-4,
                             atol=1e-5)

  def energy(log_d):  # written out, float64: the gain (1 + scale), not scale
    a, b = np.exp(log_d[:D]), np.exp(log_d[D:])
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return (np.sum(((1 + p["scale"]) * a) ** 2) + np.sum((p["up"] / a[:, None] * b) ** 2)
            + np.sum((p["down"] / b[:, None]) ** 2))
  reference = scipy.optimize.minimize(energy, np.zeros(D + F), method="BFGS",
                                      options={"gtol": 1e-10})
  assert float(enorm_jax.energy(params, GRAPH)) == pytest.approx(energy(np.zeros(D + F)),
                                                                 rel=1e-5)
  assert float(enorm_jax.energy(balanced, GRAPH)) == pytest.approx(reference.fun, rel=1e-5)


def test_copies_move_as_the_gain_and_moments_unshifted():
  params = _params()
  balanced, scales = enorm_jax.balance(params, GRAPH, cycles=3)
  copy = enorm_jax.rescale(params, scales, GRAPH)  # an EMA of the params, say
  np.testing.assert_allclose(copy["scale"], balanced["scale"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(copy["scale"], (1 + params["scale"]) * scales[0] - 1,
                             rtol=1e-6, atol=1e-6)
  grads = jax.tree.map(jnp.ones_like, params)
  moved = enorm_jax.rescale(grads, scales, GRAPH, power=enorm_jax.FIRST_MOMENT)
  np.testing.assert_allclose(moved["scale"], 1 / scales[0], rtol=1e-6)


def test_enorm_keeps_the_function():
  params = _params()
  tx = enorm_jax.enorm(optax.adam(0.0), GRAPH)
  state, p = tx.init(params), params
  for _ in range(3):
    grads = jax.grad(lambda q: jnp.sum(gemma_mlp(q, X) ** 2))(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(gemma_mlp(p, X), gemma_mlp(params, X), rtol=1e-4, atol=1e-5)
  assert float(enorm_jax.energy(p, GRAPH)) < float(enorm_jax.energy(params, GRAPH))


class GemmaNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * (1 + scale)


class GemmaMLP(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, D)(tokens)
    y = GemmaNorm(name="pre_ffw_norm")(x)
    h = nn.gelu(nn.Dense(F, use_bias=False, name="gate")(y)) * nn.Dense(
        F, use_bias=False, name="up")(y)
    x = x + nn.Dense(D, use_bias=False, name="down")(h)
    return nn.Dense(50, use_bias=False, name="head")(GemmaNorm(name="final_norm")(x))


def test_the_tracer_finds_gemma_norm_gains():
  model, tokens = GemmaMLP(), jax.random.randint(jax.random.key(1), (2, 6), 0, 50)
  params = model.init(jax.random.key(0), tokens)["params"]
  fn = lambda p, t: model.apply({"params": p}, t)
  graph = enorm_jax.trace_graph(fn, params, tokens)
  assert graph.num_units == D + F + D
  norms = [e for g in graph for e in g.producers if e.path.endswith("/scale")]
  assert [(e.path, e.shift) for e in norms] == [("pre_ffw_norm/scale", 1.0),
                                               ("final_norm/scale", 1.0)]
  # From the zero init (gain 1) the balance moves the scales off zero, exactly.
  balanced, _ = enorm_jax.balance(params, graph, cycles=5)
  assert not np.allclose(balanced["final_norm"]["scale"], 0)
  np.testing.assert_allclose(fn(balanced, tokens), fn(params, tokens), rtol=1e-4, atol=1e-5)
  enorm_jax.check_graph(fn, balanced, graph, tokens)


def test_bad_shifts_raise():
  with pytest.raises(ValueError, match="shift must be a finite number"):
    Entry("scale", 0, shift=float("nan"))
  mixed = RescalingGraph((  # "down" read with two different offsets
      Group(F, producers=(Entry("up", 1),), consumers=(Entry("down", 0, shift=0.5),)),
      Group(3, producers=(Entry("down", 1, shift=1.0),),
            consumers=(Entry("scale", 0, partial=True),))))
  with pytest.raises(ValueError, match="different shifts"):
    enorm_jax.balance(_params(), mixed)
