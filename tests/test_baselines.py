"""Path-SGD and ENorm-Impl against brute force and hand-derived gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import enorm_jax
from tests.chains import mlp_apply as apply_mlp
from tests.chains import mlp_graph, mlp_params


def bias_free_mlp(widths, seed):
  params = mlp_params(widths, seed=seed, bias=False, spread=0.5)
  kernels = [np.asarray(params[f"Dense_{k}"]["kernel"], np.float64) for k in range(len(params))]
  return params, kernels


def brute_force_kappa(kernels):
  """kappa_e = sum over input-output paths through e of the other squared weights."""
  widths = [kernels[0].shape[0]] + [k.shape[1] for k in kernels]
  kappa = [np.zeros_like(k) for k in kernels]
  for path in itertools.product(*[range(w) for w in widths]):
    edges = [(k, path[k], path[k + 1]) for k in range(len(kernels))]
    squares = [kernels[k][i, j] ** 2 for k, i, j in edges]
    for n, (k, i, j) in enumerate(edges):
      kappa[k][i, j] += np.prod(squares[:n] + squares[n + 1:])
  return kappa


def test_path_norm_scaling_matches_path_enumeration():
  params, kernels = bias_free_mlp([3, 4, 3, 2], seed=1)
  kappa = enorm_jax.contrib.path_norm_scaling(apply_mlp, params, jnp.ones((1, 3)))
  for k, expected in enumerate(brute_force_kappa(kernels)):
    np.testing.assert_allclose(kappa[f"Dense_{k}"]["kernel"], expected, rtol=1e-5)


def test_path_sgd_step_divides_the_gradient_by_kappa():
  params, kernels = bias_free_mlp([3, 4, 3, 2], seed=2)
  grads = jax.tree.map(lambda w: jnp.cos(7 * w), params)
  tx = enorm_jax.contrib.path_sgd(0.1, apply_mlp, jnp.ones((1, 3)))
  updates, _ = tx.update(grads, tx.init(params), params)
  for k, kappa in enumerate(brute_force_kappa(kernels)):
    expected = -0.1 * np.asarray(grads[f"Dense_{k}"]["kernel"]) / kappa
    np.testing.assert_allclose(updates[f"Dense_{k}"]["kernel"], expected, rtol=1e-5)


def test_path_sgd_update_is_invariant_to_rescaling():
  """Path-SGD's defining property: rescaling the net rescales the step consistently."""
  params, _ = bias_free_mlp([5, 6, 6, 3], seed=3)
  graph = mlp_graph(params)
  scales = tuple(jnp.exp(jax.random.normal(jax.random.key(i), (g.size,)))
                 for i, g in enumerate(graph))
  rescaled = enorm_jax.rescale(params, scales, graph)
  x = jax.random.normal(jax.random.key(9), (16, 5))
  tx = enorm_jax.contrib.path_sgd(0.05, apply_mlp, jnp.ones((1, 5)))

  def step(p):
    grads = jax.grad(lambda p: jnp.sum(apply_mlp(p, x) ** 2))(p)
    return optax.apply_updates(p, tx.update(grads, tx.init(p), p)[0])

  after_then_rescaled = enorm_jax.rescale(step(params), scales, graph)
  y1, y2 = apply_mlp(step(rescaled), x), apply_mlp(after_then_rescaled, x)
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5)


def test_implicit_energy_value_and_hand_derived_gradient():
  params = mlp_params([6, 5, 4, 3], seed=4, spread=1.0)
  graph = mlp_graph(params)
  zeros = enorm_jax.contrib.init_log_scales(graph)
  assert float(enorm_jax.contrib.implicit_energy(params, zeros, graph)) == pytest.approx(
      float(enorm_jax.energy(params, graph)), rel=1e-6)
  # d/d delta of sum(e^{2 delta} L^2 + e^{-2 delta} R^2) at 0 is 2 (L^2 - R^2) per unit.
  grads = jax.grad(enorm_jax.contrib.implicit_energy, argnums=1)(params, zeros, graph)
  kernels = [np.asarray(params[f"Dense_{k}"]["kernel"], np.float64) for k in range(3)]
  for g, grad in enumerate(grads):
    incoming = np.sum(kernels[g] ** 2, axis=0)
    outgoing = np.sum(kernels[g + 1] ** 2, axis=1)
    np.testing.assert_allclose(grad, 2 * (incoming - outgoing), rtol=1e-5, atol=1e-6)
  # At random log-scales it is the energy of the rescaled kernels, computed in numpy.
  deltas = tuple(jax.random.normal(jax.random.key(g), (s.size,)) for g, s in enumerate(graph))
  d = [np.exp(np.asarray(x, np.float64)) for x in deltas]
  scaled = [kernels[0] * d[0], kernels[1] / d[0][:, None] * d[1], kernels[2] / d[1][:, None]]
  assert float(enorm_jax.contrib.implicit_energy(params, deltas, graph)) == pytest.approx(
      sum(np.sum(w ** 2) for w in scaled), rel=1e-5)
