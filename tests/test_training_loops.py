"""`enorm` inside the training loops people write: frozen layers, parameter averages,
ensembles, low precision, optax's tree utilities and checkpoint restores."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import enorm_jax
from tests.chains import mlp_apply, mlp_graph, mlp_params, relative_error

WIDTHS = [6, 16, 12, 3]


def _problem(seed=0):
  params = mlp_params(WIDTHS, seed=seed, spread=1.0)
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (32, WIDTHS[0]))
  y = jax.random.normal(ky, (32, WIDTHS[-1]))
  return params, mlp_graph(params), x, y


def _grads(params, x, y):
  return jax.grad(lambda p: jnp.mean((mlp_apply(p, x) - y) ** 2))(params)


def _train(tx, params, x, y, steps, on_step=None):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(_grads(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
    if on_step is not None:
      on_step(params, state)
  return params, state


def _labels(params, frozen_layer):
  return {name: jax.tree.map(lambda _: "frozen" if name == frozen_layer else "train", layer)
          for name, layer in params.items()}


@pytest.mark.parametrize("freeze", ["multi_transform", "optax.freeze"])
def test_frozen_layer_keeps_its_values_and_its_groups_leave_the_balance(freeze):
  params, graph, x, y = _problem()
  if freeze == "multi_transform":
    inner = optax.multi_transform(
        {"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, _labels(params, "Dense_1"))
  else:
    mask = jax.tree.map(lambda _: False, params)
    mask["Dense_1"] = jax.tree.map(lambda _: True, params["Dense_1"])
    inner = optax.chain(optax.adam(1e-2), optax.freeze(mask))
  with pytest.warns(UserWarning, match="Dense_1/kernel.*left out of the balance.*"
                    "Dense_0 outputs.*Dense_1 outputs"):
    trained, _ = _train(enorm_jax.enorm(inner, graph), params, x, y, steps=3)
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(trained["Dense_1"][leaf], params["Dense_1"][leaf])
  # The other layers trained; with every group touching Dense_1 left out, none is
  # balanced here, so the run equals the inner optimizer alone.
  plain, _ = _train(inner, params, x, y, steps=3)
  assert relative_error(trained["Dense_0"]["kernel"], params["Dense_0"]["kernel"]) > 1e-3
  np.testing.assert_allclose(mlp_apply(trained, x), mlp_apply(plain, x), rtol=1e-5, atol=1e-6)


def test_frozen_first_layer_still_balances_the_groups_it_does_not_touch():
  params, graph, x, y = _problem()
  inner = optax.multi_transform({"train": optax.sgd(0.0), "frozen": optax.set_to_zero()},
                                _labels(params, "Dense_0"))
  with pytest.warns(UserWarning, match="1 group"):
    out, state = _train(enorm_jax.enorm(inner, graph, cycles=20), params, x, y, steps=1)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  assert np.all(np.asarray(state.scales[0]) == 1.0)  # Dense_0's outputs: left out
  assert np.abs(np.log(np.asarray(state.scales[1]))).max() > 1e-2  # Dense_1's: balanced
  assert relative_error(mlp_apply(out, x), mlp_apply(params, x)) < 1e-5  # lr 0: same function


def test_explicit_frozen_paths_replace_the_detection_and_are_checked():
  params, graph, x, y = _problem()
  with pytest.warns(UserWarning, match="Dense_2/kernel"):
    out, _ = _train(enorm_jax.enorm(optax.sgd(0.0), graph, frozen=["Dense_2/kernel"]),
                    params, x, y, steps=1)
  np.testing.assert_array_equal(out["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
  with pytest.raises(ValueError, match="'Dense_9/kernel'.*not parameter paths"):
    _train(enorm_jax.enorm(optax.sgd(0.0), graph, frozen=["Dense_9/kernel"]), params, x, y, 1)
  with pytest.raises(TypeError, match="pass \\['Dense_2/kernel'\\]"):
    enorm_jax.enorm(optax.sgd(0.0), graph, frozen="Dense_2/kernel")


def test_a_trained_model_warns_about_no_frozen_parameter():
  params, graph, x, y = _problem()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _train(enorm_jax.enorm(optax.adamw(1e-2), graph), params, x, y, steps=2)


def test_an_ema_of_the_params_follows_the_rescaling_with_the_states_scales():
  """At learning rate 0 the params only move along their rescaling orbit: an EMA
  moved with `rescale(ema, state.scales, graph)` must keep computing their function."""
  params, graph, x, y = _problem(seed=3)
  tx = enorm_jax.enorm(optax.sgd(0.0, momentum=0.9), graph)
  ema = {"value": params}

  def average(new_params, state):
    moved = enorm_jax.rescale(ema["value"], state.scales, graph)
    ema["value"] = optax.incremental_update(new_params, moved, step_size=0.1)

  final, _ = _train(tx, params, x, y, steps=20, on_step=average)
  assert relative_error(mlp_apply(ema["value"], x), mlp_apply(final, x)) < 1e-5
  # Without the rescale the average leaves the orbit (the test can fail).
  stale = {"value": params}
  _train(tx, params, x, y, steps=20, on_step=lambda p, s: stale.update(
      value=optax.incremental_update(p, stale["value"], step_size=0.1)))
  assert relative_error(mlp_apply(stale["value"], x), mlp_apply(final, x)) > 1e-2


def test_the_state_scales_are_ones_between_balancing_steps():
  params, graph, x, y = _problem()
  seen = []
  _train(enorm_jax.enorm(optax.sgd(1e-2), graph, every_k=2), params, x, y, steps=4,
         on_step=lambda p, s: seen.append(float(jnp.abs(jnp.log(s.scales[0])).max())))
  assert seen[0] == 0.0 and seen[2] == 0.0 and seen[1] > 0 and seen[3] > 0


def test_unknown_state_field_hint_is_measured_not_guessed():
  params, graph, x, y = _problem()
  sam = enorm_jax.enorm(optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05)), graph)
  with pytest.raises(ValueError, match="'cache'.*holds a PARAM_COPY.*"
                     "state_roles=\\{'cache': enorm_jax.PARAM_COPY\\}"):
    _train(sam, params, x, y, steps=1)

  def scale_by_mixed():  # a buffer of gradients plus params: no single role
    def init(p):
      return {"mixed": jax.tree.map(jnp.zeros_like, p)}

    def update(g, state, p):
      mixed = jax.tree.map(lambda a, b: a + b, g, p)
      return g, {"mixed": mixed}
    return optax.GradientTransformation(init, update)
  with pytest.raises(ValueError, match="'mixed'.*could not show its role"):
    _train(enorm_jax.enorm(scale_by_mixed(), graph), params, x, y, steps=1)
  # Following the measured hint trains exactly like SAM on the balanced net.
  fixed = enorm_jax.enorm(optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05)), graph,
                          state_roles={"cache": enorm_jax.PARAM_COPY})
  _train(fixed, params, x, y, steps=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_updates_land_exactly_on_the_balanced_params(dtype):
  params, graph, x, y = _problem(seed=5)
  low = jax.tree.map(lambda a: a.astype(dtype), params)
  tx = enorm_jax.enorm(optax.sgd(0.0), graph, cycles=5)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, low), tx.init(low), low)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  applied = optax.apply_updates(low, updates)
  expected, _ = enorm_jax.balance(low, graph, cycles=5)
  for a, b in zip(jax.tree.leaves(applied), jax.tree.leaves(expected)):
    assert a.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_vmap_over_an_ensemble_with_the_outermost_check():
  members = [_problem(seed=s) for s in range(4)]
  graph, x, y = members[0][1], members[0][2], members[0][3]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[m[0] for m in members])
  tx = enorm_jax.enorm(optax.sgd(1e-2, momentum=0.9), graph)
  state = jax.vmap(tx.init)(stacked)
  step = jax.jit(jax.vmap(lambda p, s: tx.update(_grads(p, x, y), s, p)))
  params = stacked
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  one, _ = _train(tx, members[2][0], x, y, steps=3)
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[2], params)), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # A member changed behind the wrapper's back is still caught, raised in the step or
  # recorded (NaN for that member only) and named on the host.
  params = jax.tree.map(lambda a: a.at[1].multiply(1.5), params)
  with pytest.raises(Exception, match="outermost"):
    jax.block_until_ready(step(params, state))
  recorded = enorm_jax.enorm(optax.sgd(1e-2, momentum=0.9), graph, check_applied="record")
  step = jax.jit(jax.vmap(lambda p, s: recorded.update(_grads(p, x, y), s, p)))
  updates, state = step(params, state)
  nan_members = [bool(jnp.all(jnp.isnan(u[i]))) for i in range(4)
                 for u in jax.tree.leaves(updates)[:1]]
  assert nan_members == [False, True, False, False]
  with pytest.raises(ValueError, match="outermost"):
    enorm_jax.raise_if_misapplied(state, graph)


def test_optax_tree_get_finds_the_inner_count():
  params, graph, _, _ = _problem()
  state = enorm_jax.enorm(optax.adam(1e-3), graph).init(params)
  assert int(optax.tree_utils.tree_get(state, "count")) == 0
  assert int(optax.tree_utils.tree_get(state, "enorm_count")) == 0


def test_a_state_restored_without_its_structure_gets_the_fix():
  params, graph, x, y = _problem()
  tx = enorm_jax.enorm(optax.adam(1e-3), graph)
  restored = tx.init(params)._asdict()  # what a restore without a target returns
  with pytest.raises(TypeError, match="restore the optimizer state with the structure of "
                     "tx.init\\(params\\)"):
    tx.update(_grads(params, x, y), restored, params)


def test_params_from_another_step_name_the_checkpoint_as_a_cause():
  params, graph, x, y = _problem()
  tx = enorm_jax.enorm(optax.sgd(1e-2), graph)
  _, state = _train(tx, params, x, y, steps=2)
  with pytest.raises(Exception, match="checkpoints of different steps"):
    jax.block_until_ready(jax.jit(tx.update)(_grads(params, x, y), state, params))


def test_lookahead_slow_params_move_with_the_fast_ones():
  """At learning rate 0 the fast params only move along their orbit; lookahead's slow
  params, interpolated towards them at every sync, must keep their function."""
  params, graph, x, y = _problem(seed=4)
  tx = enorm_jax.enorm(optax.lookahead(optax.sgd(0.0), sync_period=2, slow_step_size=0.5),
                       graph)
  lp = optax.LookaheadParams.init_synced(params)
  state = tx.init(lp)
  step = jax.jit(lambda p, s: tx.update(_grads(p.fast, x, y), s, p))
  for _ in range(5):
    updates, state = step(lp, state)
    lp = optax.apply_updates(lp, updates)
  reference = mlp_apply(params, x)
  assert relative_error(mlp_apply(lp.fast, x), reference) < 1e-5
  assert relative_error(mlp_apply(lp.slow, x), reference) < 1e-5
  assert relative_error(lp.fast["Dense_0"]["kernel"], params["Dense_0"]["kernel"]) > 1e-2


def test_shard_map_data_parallel_step_with_the_outermost_check():
  from jax.sharding import Mesh, PartitionSpec as P
  params, graph, x, y = _problem()
  tx = enorm_jax.enorm(optax.sgd(1e-2, momentum=0.9), graph)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  def step(p, s, x, y):
    updates, s = tx.update(jax.lax.pmean(_grads(p, x, y), "data"), s, p)
    return optax.apply_updates(p, updates), s
  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  p, s = params, tx.init(params)
  for _ in range(2):
    p, s = sharded(p, s, x, y)
  one, _ = _train(tx, params, x, y, steps=2)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match="outermost"):
    jax.block_until_ready(sharded(jax.tree.map(lambda a: a * 1.5, p), s, x, y))
