"""The correctly rounded division of `balance` and `rescale`.

Every test here needs XLA to contract ``a * b + c`` into one fused multiply-add
(the ``fused_multiply_add`` mark: run at XLA's default optimization level,
`conftest.py`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax
from tests.chains import mlp_apply, mlp_params

pytestmark = pytest.mark.fused_multiply_add


def test_xla_contracts_a_multiply_add():
  """The division's premise: jitted ``a * b - a`` is rounded once, not twice."""
  rng = np.random.default_rng(0)
  a, b = (rng.uniform(1, 2, 4096).astype(np.float32) for _ in range(2))
  fused = np.asarray(jax.jit(lambda a, b: a * b - a)(a, b))
  # In [1, 2) the float64 product and difference are exact, so this rounds once.
  np.testing.assert_array_equal(fused, (a.astype(np.float64) * b - a).astype(np.float32))
  assert (fused != a * b - a).any()  # numpy's float32 rounds twice


def test_repeated_single_cycles_do_not_drift_the_function():
  """XLA divides via a rounded reciprocal, biased by +2^-24 for factors just below 1.

  With that division, 300 one-cycle calls on a converged 20-layer chain drift
  its output by 1e-4; correctly rounded, by 4e-6 (unbiased rounding only).
  """
  params = mlp_params([48] * 21, bias=False)  # Appendix A's chain, narrower
  params["Dense_5"]["kernel"] *= 1.2
  params["Dense_11"]["kernel"] *= 0.8
  apply = mlp_apply
  graph = enorm_jax.chain_graph(params, [f"Dense_{k}" for k in range(20)])
  one_cycle = jax.jit(lambda p: enorm_jax.balance(p, graph)[0])
  x = jax.random.normal(jax.random.key(1), (64, 48))
  before = np.asarray(apply(params, x), np.float64)
  current = params
  for _ in range(300):
    current = one_cycle(current)
  after = np.asarray(apply(current, x), np.float64)
  assert np.abs(after - before).max() / np.abs(before).max() < 2e-5


def test_division_by_scales_is_correctly_rounded():
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      66, (enorm_jax.Entry("a", 1),), (enorm_jax.Entry("b", 0),)),))

  def divide(x, t):  # a first moment on a producer is divided by the unit's factor
    tree = {"a": x, "b": jnp.ones((66, 1), jnp.float32)}
    return enorm_jax.rescale(tree, [t], graph, power=enorm_jax.FIRST_MOMENT)["a"]
  rng = np.random.default_rng(0)
  # Magnitudes over 2^+-115, so quotients from 2^-100 up to overflow (inf).
  x = (rng.standard_normal((1000, 66))
       * np.exp2(rng.uniform(-80, 115, (1000, 1)))).astype(np.float32)
  x[0, :5] = [np.inf, -np.inf, np.nan, 0.0, -0.0]
  # Just below 1 (where XLA's reciprocal is biased), exactly 1, near 1, and spread out.
  t = np.concatenate([1 - np.arange(1, 46, 2) * 2.0 ** -24, [1.0], 1 + rng.standard_normal(21) * 1e-4,
                      np.exp(5 * rng.standard_normal(20)), [2.0 ** -20]]).astype(np.float32)
  with np.errstate(over="ignore"):
    expected = x / t
  # Below 2^-100 the correction term would be subnormal (flushed to zero on CPU).
  checked = ~(np.abs(expected) < 2.0 ** -100)
  got = np.asarray(jax.jit(divide)(x, t))
  np.testing.assert_array_equal(got[checked], expected[checked])
  assert np.isinf(expected).any() and np.array_equal(np.isnan(got), np.isnan(expected))
  eager = np.asarray(divide(x, t))  # no enclosing jit to fuse the multiply-add
  np.testing.assert_array_equal(eager[checked], expected[checked])


def test_eager_rescale_writes_the_same_bits_as_jitted_rescale():
  rng = np.random.default_rng(7)
  params = {"a": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)}
  graph = enorm_jax.RescalingGraph((
      enorm_jax.Group(4, (enorm_jax.Entry("a", 3),), (enorm_jax.Entry("b", 2),)),))
  scales = [np.exp(rng.standard_normal(4)).astype(np.float32)]
  eager = enorm_jax.rescale(params, scales, graph)
  jitted = jax.jit(enorm_jax.rescale, static_argnums=2)(params, scales, graph)
  np.testing.assert_array_equal(eager["b"], jitted["b"])
  np.testing.assert_array_equal(eager["b"], np.asarray(params["b"]) / scales[0][:, None])


def test_rescale_of_a_conv_kernel_divides_correctly_rounded_along_its_input_axis():
  rng = np.random.default_rng(5)
  params = {"a": rng.standard_normal((3, 3, 2, 4)), "b": rng.standard_normal((3, 3, 4, 5)),
            "c": rng.standard_normal((5, 3))}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  graph = enorm_jax.RescalingGraph((
      enorm_jax.Group(4, (enorm_jax.Entry("a", 3),), (enorm_jax.Entry("b", 2),)),
      enorm_jax.Group(5, (enorm_jax.Entry("b", 3),), (enorm_jax.Entry("c", 0),)),
  ))
  scales = [np.float32(1 - np.arange(1, 9, 2) * 2.0 ** -24),
            np.exp(rng.standard_normal(5)).astype(np.float32)]
  out = jax.jit(enorm_jax.rescale, static_argnums=2)(params, scales, graph)
  b = np.asarray(params["b"])
  np.testing.assert_array_equal(out["b"], (b / scales[0][:, None]) * scales[1])  # graph order
  np.testing.assert_array_equal(out["c"], np.asarray(params["c"]) / scales[1][:, None])
