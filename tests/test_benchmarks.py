"""The benchmark helpers compute what their docstrings say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cycle


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {"conv": jax.random.normal(keys[0], (3, 3, 4, 5)),
          "pointwise": jax.random.normal(keys[1], (1, 1, 5, 6)),
          "dense": jax.random.normal(keys[2], (6, 7)),
          "bias": jax.random.normal(keys[3], (7,))}


def test_unit_norms_are_the_sums_over_inputs_and_outputs():
  params = _params()
  sums = jax.jit(cycle.unit_norms)(params)
  expected = []
  for w in jax.tree.leaves(params):
    if w.ndim >= 2:
      sq = np.asarray(w, np.float64).reshape(-1, *w.shape[-2:]) ** 2
      expected += [sq.sum(axis=(0, 1)), sq.sum(axis=(0, 2))]
  assert len(sums) == len(expected)
  for got, want in zip(sums, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_last_axis_norms_read_every_kernel_once(weighted):
  params = _params()
  sums = jax.jit(lambda p: cycle.last_axis_norms(p, weighted))(params)
  kernels = [w for w in jax.tree.leaves(params) if w.ndim >= 2]
  assert len(sums) == len(kernels)
  for got, w in zip(sums, kernels):
    weights = np.linspace(0.5, 1.5, w.shape[-1]) if weighted else 1.0
    np.testing.assert_allclose(got, (np.asarray(w, np.float64) ** 2 * weights).sum(axis=-1),
                               rtol=1e-5)


def test_read_then_write_scales_every_weight_by_one_common_factor():
  params = _params()
  out = jax.jit(cycle.read_then_write)(params)
  for w, v in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    np.testing.assert_allclose(v, w, rtol=1e-6)
    assert v.dtype == w.dtype
  assert cycle.read_then_write(jax.tree.map(jnp.zeros_like, params))["dense"].sum() == 0


def test_read_twice_then_write_reads_shared_kernels_again_and_keeps_values():
  from enorm_jax.models import FullyConnected
  model = FullyConnected(depth=2, width=8)
  params = model.init(jax.random.key(0), jnp.ones((1, 3072)))["params"]
  graph = model.rescaling_graph(params)
  assert cycle.role_paths(graph, "producers") & cycle.role_paths(graph, "consumers") == {
      "Dense_1/kernel", "Dense_2/kernel"}
  out = jax.jit(lambda p: cycle.read_twice_then_write(p, graph))(params)
  for w, v in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    np.testing.assert_allclose(v, w, rtol=1e-6)


def test_per_unit_write_scales_each_kernel_along_its_unit_axes(monkeypatch):
  from enorm_jax.models import FullyConnected
  model = FullyConnected(depth=2, width=8)
  params = model.init(jax.random.key(0), jnp.ones((1, 3072)))["params"]
  graph = model.rescaling_graph(params)
  params["Dense_0"]["bias"] = jnp.linspace(1.0, 2.0, 8)  # initialised to zeros
  monkeypatch.setattr(cycle, "_NUDGE", 1e-4)  # factors visibly different from 1
  out = jax.jit(lambda p: cycle.read_twice_then_write(p, graph, per_unit=True))(params)
  ratio = {k: np.asarray(out[k]["kernel"], np.float64) / np.asarray(params[k]["kernel"])
           for k in ("Dense_0", "Dense_1", "Dense_3")}
  varies = lambda r, axis: np.ptp(r, axis=axis).max() > 1e-4
  assert varies(ratio["Dense_0"], 1) and not varies(ratio["Dense_0"], 0)  # producer only
  assert varies(ratio["Dense_3"], 0) and not varies(ratio["Dense_3"], 1)  # consumer only
  assert varies(ratio["Dense_1"], 0) and varies(ratio["Dense_1"], 1)  # both
  # Rank one: out / w is an outer product of an input and an output vector.
  r = ratio["Dense_1"]
  np.testing.assert_allclose(r, np.outer(r[:, 0], r[0]) / r[0, 0], rtol=1e-5)
  bias = np.asarray(out["Dense_0"]["bias"]) / np.asarray(params["Dense_0"]["bias"])
  np.testing.assert_allclose(bias, ratio["Dense_0"][0], rtol=1e-5)


@pytest.mark.parametrize("rescale_state", [True, False])
def test_row_rescale_scales_stepped_rows_and_divides_momentum_rows(rescale_state):
  import optax
  from benchmarks.step import row_rescale
  params = _params()
  grads = jax.tree.map(lambda w: jnp.cos(w), params)
  inner = optax.sgd(0.1, momentum=0.9)
  tx = row_rescale(inner, rescale_state)
  updates, state = tx.update(grads, tx.init(params), params)
  _, inner_state = inner.update(grads, inner.init(params), params)
  new = optax.apply_updates(params, updates)
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    name = path[0].key
    stepped = np.asarray(w, np.float64) - 0.1 * np.asarray(grads[name], np.float64)
    trace = np.asarray(inner_state[0].trace[name], np.float64)
    factor = 1.0
    if w.ndim >= 2:
      factor = 1 / np.sqrt(1 + (stepped ** 2).mean(axis=-1, keepdims=True))
    np.testing.assert_allclose(new[name], stepped * factor, rtol=1e-5)
    np.testing.assert_allclose(state[0].trace[name],
                               trace / factor if rescale_state else trace, rtol=1e-5)


def test_interleaved_timing_calls_each_step_once_per_round_after_varied_predecessors():
  from benchmarks import _common
  calls = []
  steps = {name: (lambda s, name=name: calls.append(name) or s + 1, 0) for name in "abcd"}
  ms = _common.interleaved_ms(steps, reps=40, warmup=1)
  assert set(ms) == set("abcd")
  rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
  assert len(rounds) == 41 and all(sorted(r) == list("abcd") for r in rounds)
  sequence = "".join(calls)
  before_a = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == "a"}
  assert set("bcd") <= before_a  # rotating "abcd" always put d before a
  assert len({r[0] for r in rounds}) == 4
  calls.clear()
  _common.interleaved_ms(steps, reps=40, warmup=1)
  assert "".join(calls) == sequence  # seeded: the same order again


def test_placements_time_fresh_copies_and_never_donate_the_given_state():
  from benchmarks import _common
  donating = jax.jit(lambda s: s + 1, donate_argnums=0)
  origin = jnp.zeros(4)
  seen = []
  steps = {"a": (lambda s: seen.append(float(s[0])) or donating(s), origin)}
  medians = _common.placements_ms(steps, placements=3, reps=2, warmup=1)
  assert len(medians["a"]) == 3
  # Every placement starts again from the given state, which is still alive.
  assert seen == [0.0, 1.0, 2.0] * 3
  assert float(origin.sum()) == 0.0


def test_paired_ratio_cancels_drifts_shared_by_a_placement():
  from benchmarks import _common
  rng = np.random.default_rng(1)
  drift = 100 * np.exp(rng.normal(0, 0.1, 40))  # each placement's machine speed
  ratio, low, high = _common.paired_ratio(list(1.02 * drift * np.exp(rng.normal(0, 0.002, 40))),
                                          list(drift))
  # Drifts of 10 % between placements; the paired ratio still resolves 2 % to 0.3 %.
  assert abs(ratio - 1.02) < 0.002 and low < 1.02 < high and high - low < 0.006
  ratio, low, high = _common.paired_ratio([110.0, 220.0, 55.0], [100.0, 200.0, 50.0])
  assert np.isclose(ratio, 1.1) and np.isclose(low, 1.1) and np.isclose(high, 1.1)
