"""`balance`, `energy` and `rescale` against independent references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax
from enorm_jax.models import CifarNV, FullyConnected, ResNet18C
from tests import reference
from tests.chains import mlp_apply, mlp_graph, mlp_params, relative_error

balance_jit = jax.jit(enorm_jax.balance,
                      static_argnames=("graph", "p", "c", "cycles", "include_biases",
                                       "schedule"))


def random_scales(graph, key, sigma=1.0):
  keys = jax.random.split(key, len(graph))
  return tuple(jnp.exp(sigma * jax.random.normal(k, (g.size,))) for k, g in zip(keys, graph))


def with_random_biases(params, key):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = [v + 0.1 * jax.random.normal(k, v.shape) if kp[-1].key == "bias" else v
         for (kp, v), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, out)


ARCHITECTURES = {
    "fc": (lambda: FullyConnected(depth=3, width=64), (4, 32, 32, 3)),
    "cifar_nv": (lambda: CifarNV(width=0.25), (4, 28, 28, 3)),
    "resnet18c": (lambda: ResNet18C(stem="cifar", num_classes=10, widths=(8, 16, 16, 32)),
                  (4, 16, 16, 3)),
    "resnet18c_imagenet": (lambda: ResNet18C(widths=(8, 8, 16, 16)), (2, 64, 64, 3)),
}


# The ResNets are slow: test_trace checks their graphs against hand-declared ones,
# and this test keeps the function of the FC and CIFAR-NV nets.
@pytest.mark.parametrize("name", [n if not n.startswith("resnet18c") else pytest.param(
    n, marks=pytest.mark.slow) for n in sorted(ARCHITECTURES)])
def test_function_preserved_on_paper_architectures(name):
  make, shape = ARCHITECTURES[name]
  model = make()
  x = jax.random.normal(jax.random.key(0), shape)
  params = with_random_biases(model.init(jax.random.key(1), x)["params"], jax.random.key(2))
  graph = model.rescaling_graph(params)
  y = model.apply({"params": params}, x)

  scrambled = enorm_jax.rescale(params, random_scales(graph, jax.random.key(3)), graph)
  assert relative_error(model.apply({"params": scrambled}, x), y) < 1e-5

  for schedule in ("sequential", "parallel"):
    balanced, scales = balance_jit(scrambled, graph=graph, cycles=3, schedule=schedule)
    assert relative_error(model.apply({"params": balanced}, x), y) < 1e-5
    assert float(enorm_jax.energy(balanced, graph)) < float(enorm_jax.energy(scrambled, graph))
    assert all(s.shape == (g.size,) and bool(jnp.all(s > 0)) for s, g in zip(scales, graph))


def test_rescale_matches_balance_output():
  params = mlp_params([6, 5, 4, 3], spread=1.0)
  graph = mlp_graph(params)
  balanced, scales = enorm_jax.balance(params, graph, cycles=2)
  chex.assert_trees_all_close(enorm_jax.rescale(params, scales, graph), balanced, rtol=1e-6)
  # Gradient-like and second-moment counterparts invert and square the factors.
  ones = jax.tree.map(jnp.ones_like, params)
  grads = enorm_jax.rescale(ones, scales, graph, power=enorm_jax.FIRST_MOMENT)
  second = enorm_jax.rescale(ones, scales, graph, power=enorm_jax.SECOND_MOMENT)
  multiplier = enorm_jax.rescale(ones, scales, graph)
  chex.assert_trees_all_close(jax.tree.map(lambda g, m: g * m, grads, multiplier), ones,
                              rtol=1e-6)
  chex.assert_trees_all_close(second, jax.tree.map(lambda g: g * g, grads), rtol=1e-6)


def test_one_cycle_matches_eq5_by_hand():
  """Three layers, two hidden groups, every number computed by hand (eq. 5)."""
  w1 = np.array([[1.0, 2.0], [2.0, 0.5]])     # 2 -> 2
  w2 = np.array([[3.0, 0.0], [4.0, 1.0]])     # 2 -> 2
  w3 = np.array([[2.0], [1.0]])               # 2 -> 1
  params = {f"Dense_{k}": {"kernel": jnp.asarray(w, jnp.float32)}
            for k, w in enumerate((w1, w2, w3))}
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph, c=1.0)
  # Group 1: L = column norms of W1 = (sqrt(5), sqrt(4.25)); R = row norms of W2 = (3, sqrt(17)).
  d1 = np.sqrt(np.array([3.0, np.sqrt(17.0)]) / np.array([np.sqrt(5.0), np.sqrt(4.25)]))
  w1b, w2b = w1 * d1[None, :], w2 / d1[:, None]
  # Group 2 uses the updated W2: L = its column norms, R = row norms of W3 = (2, 1).
  d2 = np.sqrt(np.array([2.0, 1.0]) / np.sqrt((w2b ** 2).sum(axis=0)))
  expected = (w1b, w2b * d2[None, :], w3 / d2[:, None])
  for k, w in enumerate(expected):
    np.testing.assert_allclose(out[f"Dense_{k}"]["kernel"], w, rtol=1e-6)
  np.testing.assert_allclose(scales[0], d1, rtol=1e-6)
  np.testing.assert_allclose(scales[1], d2, rtol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("c", [1.0, 1.2])
@pytest.mark.parametrize("include_biases", [False, True])
def test_matches_numpy_algorithm1_and_newton_minimum(p, c, include_biases):
  params = mlp_params([7, 6, 5, 6, 4], seed=int(p * 10 + c * 100), spread=1.5)
  graph = mlp_graph(params)
  kernels = [np.asarray(params[f"Dense_{k}"]["kernel"]) for k in range(4)]
  biases = [np.asarray(params[f"Dense_{k}"]["bias"]) for k in range(4)]
  # The output layer's bias is in no group, so `energy` leaves it out.
  counted_biases = biases[:3] + [None] if include_biases else None

  # Five cycles agree with the float64 reference of Algorithm 1.
  out, _ = enorm_jax.balance(params, graph, p=p, c=c, cycles=5, include_biases=include_biases)
  ref_w, ref_b, _ = reference.balance_chain(kernels, biases, p=p, c=c, cycles=5,
                                            include_biases=include_biases)
  for k in range(4):
    np.testing.assert_allclose(out[f"Dense_{k}"]["kernel"], ref_w[k], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(out[f"Dense_{k}"]["bias"], ref_b[k], rtol=2e-5, atol=1e-7)

  # Many cycles reach the minimum found by trust-region Newton on the convex problem in log d.
  converged, _ = balance_jit(params, graph=graph, p=p, c=c, cycles=600,
                             include_biases=include_biases)
  e = float(enorm_jax.energy(converged, graph, p=p, c=c, include_biases=include_biases))
  e_ref = reference.newton_minimum(kernels, p=p, c=c, biases=counted_biases)
  assert e == pytest.approx(e_ref, rel=1e-5)
  # The energy definition is the paper's: it agrees with the reference formula.
  e_start = float(enorm_jax.energy(params, graph, p=p, c=c, include_biases=include_biases))
  assert e_start == pytest.approx(
      reference.chain_energy(kernels, p, c, counted_biases), rel=1e-5)


@pytest.mark.parametrize("p,c", [(2.0, 1.0), (1.0, 1.2), (3.0, 1.0)])
def test_energy_never_increases_and_minimum_is_unique(p, c):
  params = mlp_params([10, 8, 8, 8, 6], seed=3, spread=1.0)
  graph = mlp_graph(params)
  energies = []
  current = params
  for _ in range(30):
    current, _ = balance_jit(current, graph=graph, p=p, c=c)
    energies.append(float(enorm_jax.energy(current, graph, p=p, c=c)))
  assert all(b <= a * (1 + 1e-6) for a, b in zip(energies, energies[1:]))

  finals = []
  for seed in range(3):
    start = enorm_jax.rescale(params, random_scales(graph, jax.random.key(seed), 2.0), graph)
    out, _ = balance_jit(start, graph=graph, p=p, c=c, cycles=500)
    finals.append(out)
  for other in finals[1:]:
    chex.assert_trees_all_close(other, finals[0], rtol=2e-4, atol=1e-6)


@pytest.mark.slow  # test_properties checks the unique minimum on random nets by default
def test_type_c_resnet_converges_to_unique_minimum():
  model = ResNet18C(stem="cifar", num_classes=10, widths=(4, 8, 8, 8))
  params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))["params"]
  graph = model.rescaling_graph(params)
  finals = []
  for seed in range(2):
    start = enorm_jax.rescale(params, random_scales(graph, jax.random.key(seed), 1.5), graph)
    out, _ = balance_jit(start, graph=graph, cycles=300, schedule="parallel")
    finals.append(out)
  chex.assert_trees_all_close(finals[1], finals[0], rtol=1e-3, atol=1e-6)
  sequential, _ = balance_jit(params, graph=graph, cycles=300)
  assert float(enorm_jax.energy(sequential, graph)) == pytest.approx(
      float(enorm_jax.energy(finals[0], graph)), rel=1e-5)


def test_parallel_and_sequential_schedules_reach_same_minimum():
  params = mlp_params([12, 10, 10, 10, 10, 5], seed=5, spread=1.0)
  graph = mlp_graph(params)
  assert len(graph.phases) == 2
  seq, _ = balance_jit(params, graph=graph, cycles=400)
  par, _ = balance_jit(params, graph=graph, cycles=400, schedule="parallel")
  chex.assert_trees_all_close(seq, par, rtol=2e-4, atol=1e-6)


def test_dead_units_and_zero_layers_keep_scale_one():
  params = mlp_params([5, 4, 4, 3], seed=1)
  k0 = params["Dense_0"]["kernel"].at[:, 1].set(0.0)      # unit 1 has no input
  k2 = params["Dense_2"]["kernel"].at[2, :].set(0.0)      # unit 2 of group 1 has no output
  params["Dense_0"]["kernel"], params["Dense_2"]["kernel"] = k0, k2
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph, cycles=5)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
  assert float(scales[0][1]) == 1.0 and float(scales[1][2]) == 1.0
  assert float(jnp.min(jnp.abs(scales[0] - 1.0))) == 0.0
  assert bool(jnp.any(jnp.abs(scales[0] - 1.0) > 1e-3))  # the live units still move

  zero = jax.tree.map(jnp.zeros_like, params)
  out, scales = enorm_jax.balance(zero, graph, cycles=2)
  chex.assert_trees_all_equal(out, zero)
  assert all(bool(jnp.all(s == 1.0)) for s in scales)


def test_nan_weights_only_freeze_their_units():
  params = mlp_params([5, 4, 4, 3], seed=2, spread=1.0)
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 3].set(jnp.nan)
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph)
  # Group 0 unit 0 (row 0 of Dense_1) and group 1 unit 3 (column 3) see the NaN.
  assert float(scales[0][0]) == 1.0 and float(scales[1][3]) == 1.0
  assert bool(jnp.all(jnp.isfinite(scales[0]))) and bool(jnp.all(jnp.isfinite(scales[1])))
  assert bool(jnp.any(scales[0][1:] != 1.0))
  nan_count = sum(int(jnp.isnan(leaf).sum()) for leaf in jax.tree.leaves(out))
  assert nan_count == 1


def test_extreme_magnitudes_do_not_underflow():
  params = mlp_params([6, 5, 5, 4], seed=4)
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"] * 1e-25
  params["Dense_2"]["kernel"] = params["Dense_2"]["kernel"] * 1e25
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph, cycles=50)
  assert all(bool(jnp.all(jnp.isfinite(s) & (s > 0))) for s in scales)
  norms = [float(jnp.linalg.norm(out[f"Dense_{k}"]["kernel"])) for k in range(3)]
  assert max(norms) / min(norms) < 10.0, norms


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_keep_dtype_and_function(dtype):
  params = mlp_params([8, 16, 16, 4], seed=6, spread=1.0)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  graph = mlp_graph(params)
  out, scales = enorm_jax.balance(params, graph, cycles=3)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(out))
  assert all(s.dtype == jnp.float32 for s in scales)
  x = jax.random.normal(jax.random.key(0), (16, 8)).astype(dtype)
  y0 = mlp_apply(params, x).astype(jnp.float32)
  y1 = mlp_apply(out, x).astype(jnp.float32)
  assert relative_error(y1, y0) < 0.05
  assert float(enorm_jax.energy(out, graph)) < float(enorm_jax.energy(params, graph))


def test_leaves_outside_graph_pass_through():
  params = mlp_params([5, 4, 3], seed=7)
  params["step"] = jnp.array(3, jnp.int32)
  params["extra"] = {"table": jnp.ones((2, 2))}
  graph = mlp_graph({k: v for k, v in params.items() if k.startswith("Dense")})
  out, _ = enorm_jax.balance(params, graph)
  assert out["step"] is params["step"] and out["extra"]["table"] is params["extra"]["table"]


def test_energy_requires_consistent_heights_for_c():
  model = ResNet18C(stem="cifar", num_classes=10, widths=(4, 4, 4, 4))
  params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))["params"]
  graph = model.rescaling_graph(params)
  assert graph.heights is None
  with pytest.raises(ValueError, match="c != 1"):
    enorm_jax.energy(params, graph, c=1.2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=0.0), "p must be"), (dict(c=-1.0), "c must be"), (dict(cycles=0), "cycles"),
    (dict(schedule="random"), "schedule")])
def test_bad_hyperparameters_raise(kwargs, match):
  params = mlp_params([4, 3, 2])
  with pytest.raises(ValueError, match=match):
    enorm_jax.balance(params, mlp_graph(params), **kwargs)


def test_rescale_rejects_wrong_scales():
  params = mlp_params([4, 3, 2])
  graph = mlp_graph(params)
  with pytest.raises(ValueError, match="1 groups"):
    enorm_jax.rescale(params, (jnp.ones(3), jnp.ones(3)), graph)
  with pytest.raises(ValueError, match=r"expected \(3,\)"):
    enorm_jax.rescale(params, (jnp.ones(4),), graph)


def numpy_conv_chain_balance(kernels, biases, p, c, cycles, include_biases):
  """Algorithm 1 on a chain of HWIO conv kernels, in float64, straight from eq. (5)."""
  ks = [np.asarray(k, np.float64) for k in kernels]
  bs = [np.asarray(b, np.float64) for b in biases]
  for _ in range(cycles):
    for g in range(len(ks) - 1):  # hidden group g sits between kernels g and g + 1
      incoming = np.sum(np.abs(ks[g]) ** p, axis=(0, 1, 2))
      if include_biases:
        incoming = incoming + np.abs(bs[g]) ** p
      outgoing = np.sum(np.abs(ks[g + 1]) ** p, axis=(0, 1, 3))
      d = np.sqrt((outgoing / incoming) ** (1 / p)) / np.sqrt(c)
      ks[g], bs[g] = ks[g] * d, bs[g] * d
      ks[g + 1] = ks[g + 1] / d[:, None]
  return ks, bs


@pytest.mark.parametrize("p,c,include_biases", [(2.0, 1.0, False), (1.0, 1.2, True),
                                                (3.0, 1.0, True)])
def test_conv_chain_matches_numpy_algorithm1(p, c, include_biases):
  """Conv kernels take the per-tap-summed path; 1x1 and 7x7 taps too."""
  rng = np.random.default_rng(int(p * 10))
  shapes = [(7, 7, 3, 6), (3, 3, 6, 5), (1, 1, 5, 7), (3, 3, 7, 4), (2, 2, 4, 3)]
  params = {f"Conv_{k}": {
      "kernel": jnp.asarray(rng.standard_normal(s) * np.exp(rng.standard_normal()), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal(s[-1]), jnp.float32)} for k, s in enumerate(shapes)}
  graph = enorm_jax.chain_graph(params, list(params))
  out, _ = balance_jit(params, graph=graph, p=p, c=c, cycles=4, include_biases=include_biases)
  ref_k, ref_b = numpy_conv_chain_balance(
      [params[n]["kernel"] for n in params], [params[n]["bias"] for n in params],
      p, c, 4, include_biases)
  for k, name in enumerate(params):
    np.testing.assert_allclose(out[name]["kernel"], ref_k[k], rtol=3e-5, atol=1e-7)
    np.testing.assert_allclose(out[name]["bias"], ref_b[k], rtol=3e-5, atol=1e-7)


def test_grouped_conv_with_overlapping_entries_matches_numpy():
  """A grouped 3x3 conv whose input and output entries share the group axis.

  The tap sums of such a kernel cannot be contracted with one factor vector per
  entry, so `balance` weights them elementwise; checked against a float64
  Algorithm 1 written for this net.
  """
  rng = np.random.default_rng(3)
  a = rng.standard_normal((3, 6)) * 2.0
  g = rng.standard_normal((3, 3, 3, 4)) * 0.3  # 6 -> 4 channels in 2 groups
  h = rng.standard_normal((4, 2))
  params = {"a": jnp.asarray(a, jnp.float32), "g": jnp.asarray(g, jnp.float32),
            "h": jnp.asarray(h, jnp.float32)}
  # Input channel u = 3 * group + i, output channel o = 2 * group + j.
  view = (3, 3, 3, 2, 2)
  graph = enorm_jax.RescalingGraph((
      enorm_jax.Group(6, (enorm_jax.Entry("a", 1),), (enorm_jax.Entry("g", (3, 2), view=view),)),
      enorm_jax.Group(4, (enorm_jax.Entry("g", (3, 4), view=view),), (enorm_jax.Entry("h", 0),)),
  ))
  out, _ = balance_jit(params, graph=graph, cycles=4)

  gv = g.reshape(view)
  for _ in range(4):
    incoming = np.sum(a ** 2, axis=0)
    outgoing = np.sum(gv ** 2, axis=(0, 1, 4)).T.reshape(-1)  # (group, i) -> u
    d = np.sqrt(np.sqrt(outgoing / incoming))
    a = a * d
    gv = gv / d.reshape(2, 3).T[None, None, :, :, None]
    incoming = np.sum(gv ** 2, axis=(0, 1, 2)).reshape(-1)  # (group, j) -> o
    outgoing = np.sum(h ** 2, axis=1)
    d = np.sqrt(np.sqrt(outgoing / incoming))
    gv = gv * d.reshape(2, 2)[None, None, None]
    h = h / d[:, None]
  np.testing.assert_allclose(out["a"], a, rtol=3e-5)
  np.testing.assert_allclose(out["g"], gv.reshape(g.shape), rtol=3e-5)
  np.testing.assert_allclose(out["h"], h, rtol=3e-5)
