"""Bad inputs raise (or are made right) instead of giving a silent wrong answer."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import enorm_jax
from enorm_jax import Entry, Group, RescalingGraph


def _mlp(width, depth=2):
  layers = []
  for _ in range(depth):
    layers += [nn.Dense(width), nn.relu]
  model = nn.Sequential(layers + [nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  names = [f"layers_{2 * i}" for i in range(depth + 1)]
  return model, params, names


# --- A graph must cover every position of every rescaled axis exactly once. ---

def test_graph_for_a_narrower_model_raises_everywhere():
  model, p32, names = _mlp(32)
  _, p16, _ = _mlp(16)
  graph = enorm_jax.chain_graph(p16, names)
  match = r"'layers_0/kernel', axis 1: .* covers positions 0..15 .* of 32.*16..31 uncovered"
  with pytest.raises(ValueError, match=match):
    graph.validate(p32)
  with pytest.raises(ValueError, match=match):
    enorm_jax.balance(p32, graph)
  with pytest.raises(ValueError, match=match):
    enorm_jax.rescale(p32, [jnp.ones(16), jnp.ones(16)], graph)
  tx = enorm_jax.enorm(optax.sgd(0.1), graph)
  with pytest.raises(ValueError, match=match):
    tx.update(jax.tree.map(jnp.zeros_like, p32), tx.init(p32), p32)
  apply = lambda p, x: model.apply({"params": p}, x)
  with pytest.raises(ValueError, match=match):
    enorm_jax.check_graph(apply, p32, graph, jnp.ones((3, 4)))


def test_group_one_column_short_raises():
  params = {"a": {"kernel": jnp.ones((4, 13))}, "b": {"kernel": jnp.ones((13, 2))}}
  graph = RescalingGraph((Group(12, (Entry("a/kernel", 1),), (Entry("b/kernel", 0),)),))
  with pytest.raises(ValueError, match=r"'a/kernel', axis 1: .* of 13, and leaves 12 uncovered"):
    enorm_jax.balance(params, graph)


def test_declared_partial_entries_and_concatenations_are_accepted():
  params = {"a": {"kernel": jnp.ones((4, 13))}, "b": {"kernel": jnp.ones((13, 2))}}
  partial = RescalingGraph((Group(12, (Entry("a/kernel", 1, partial=True),),
                                  (Entry("b/kernel", 0, partial=True),)),))
  balanced, _ = enorm_jax.balance(params, partial, c=1.2)
  assert float(balanced["a"]["kernel"][0, 12]) == 1.0  # the unit left out is untouched
  assert float(balanced["a"]["kernel"][0, 0]) != 1.0
  # Two groups that split one consumer's rows (a concatenation) cover it together.
  params = {"a": {"kernel": jnp.ones((4, 5))}, "b": {"kernel": jnp.ones((4, 3))},
            "c": {"kernel": jnp.ones((8, 2))}}
  concat = RescalingGraph((Group(5, (Entry("a/kernel", 1),), (Entry("c/kernel", 0),)),
                           Group(3, (Entry("b/kernel", 1),), (Entry("c/kernel", 0, offset=5),))))
  concat.validate(params)


def test_overlapping_units_raise():
  params = {"a": {"kernel": jnp.ones((4, 6))}, "b": {"kernel": jnp.ones((6, 2))}}
  graph = RescalingGraph((
      Group(4, (Entry("a/kernel", 1),), (Entry("b/kernel", 0),), name="first"),
      Group(3, (Entry("a/kernel", 1, offset=3),), (Entry("b/kernel", 0, offset=3),),
            name="second")))
  with pytest.raises(ValueError, match=r"positions 3..3 belong to two units \('first' and"):
    graph.validate(params)


class _HalfRelu(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    h = jnp.concatenate([jax.nn.relu(h[:, :5]), jax.nn.gelu(h[:, 5:])], axis=-1)
    return nn.Dense(2)(h)


def test_traced_partial_layers_are_marked_and_keep_the_function():
  model = _HalfRelu()
  x = jax.random.normal(jax.random.key(1), (6, 3))
  params = model.init(jax.random.key(0), x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  graph = enorm_jax.trace_graph(apply, params, x[:1])
  assert graph.num_units == 5
  assert all(e.partial for g in graph for e in g.producers + g.consumers)
  enorm_jax.check_graph(apply, params, graph, x)
  balanced, _ = enorm_jax.balance(params, graph, c=1.2, cycles=3)
  np.testing.assert_allclose(apply(balanced, x), apply(params, x), rtol=1e-5, atol=1e-6)


# --- Graph arguments of the wrong type. ---

def test_trace_report_or_swapped_arguments_get_a_type_error():
  model, params, names = _mlp(8)
  apply = lambda p, x: model.apply({"params": p}, x)
  report = enorm_jax.explain_graph(apply, params, jnp.ones((1, 4)))
  scales = [jnp.ones(8), jnp.ones(8)]
  calls = [lambda g: enorm_jax.balance(params, g), lambda g: enorm_jax.energy(params, g),
           lambda g: enorm_jax.rescale(params, scales, g),
           lambda g: enorm_jax.enorm(optax.sgd(0.1), g),
           lambda g: enorm_jax.check_graph(apply, params, g, jnp.ones((2, 4))),
           lambda g: enorm_jax.contrib.init_log_scales(g)]
  for call in calls:
    with pytest.raises(TypeError, match="pass report.graph"):
      call(report)
  with pytest.raises(TypeError, match="check the argument order"):
    enorm_jax.rescale(params, report.graph, scales)


# --- Optimizer state roles. ---

def test_state_roles_with_bad_powers_or_unknown_fields_raise():
  _, params, names = _mlp(8)
  graph = enorm_jax.chain_graph(params, names)
  with pytest.raises(ValueError, match=r"state_roles\['nu'\]=3 is not a role"):
    enorm_jax.enorm(optax.adam(1e-3), graph, state_roles={"nu": 3})
  tx = enorm_jax.enorm(optax.adam(1e-3), graph, state_roles={"nuu": enorm_jax.SECOND_MOMENT})
  with pytest.raises(ValueError, match=r"state_roles names \['nuu'\].*its fields: .*'nu'"):
    tx.init(params)


# --- check_graph in low precision. ---

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("compute_dtype", [None, "param"])
def test_check_graph_passes_valid_and_fails_wrong_graphs_in_every_dtype(dtype, compute_dtype):
  width = 16
  layers = []
  for _ in range(4):
    layers += [nn.Dense(width, param_dtype=dtype,
                        dtype=dtype if compute_dtype == "param" else None), nn.relu]
  model = nn.Sequential(layers + [nn.Dense(3, param_dtype=dtype)])
  x = jax.random.normal(jax.random.key(1), (8, 6))
  params = model.init(jax.random.key(0), x)["params"]
  names = [f"layers_{2 * i}" for i in range(5)]
  apply = lambda p, x: model.apply({"params": p}, x)
  graph = enorm_jax.chain_graph(params, names)
  enorm_jax.check_graph(apply, params, graph, x)
  # Wrong: the second group's consumer read along its output axis instead.
  wrong = RescalingGraph(graph.groups[:1] + (
      Group(width, graph.groups[1].producers, (Entry("layers_4/kernel", 1),)),)
      + graph.groups[2:])
  with pytest.raises(ValueError, match="does not preserve the function"):
    enorm_jax.check_graph(apply, params, wrong, x)


# --- enorm must be the outermost transformation. ---

@pytest.mark.parametrize("after", [optax.scale(0.5), optax.clip_by_global_norm(1e-3)])
def test_a_transformation_after_enorm_raises_at_the_next_update(after):
  model, params, names = _mlp(8)
  graph = enorm_jax.chain_graph(params, names)
  tx = optax.chain(enorm_jax.enorm(optax.sgd(0.1), graph, c=1.2), after)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  state = tx.init(params)
  updates, state = step(params, state)  # the first update cannot be checked
  params = optax.apply_updates(params, updates)
  with pytest.raises(Exception, match="enorm must be the outermost transformation"):
    jax.block_until_ready(step(params, state))


@pytest.mark.parametrize("after", [optax.scale(0.5), optax.clip_by_global_norm(1e-3)])
def test_a_recorded_check_poisons_the_updates_and_names_the_leaves(after):
  model, params, names = _mlp(8)
  graph = enorm_jax.chain_graph(params, names)
  tx = optax.chain(enorm_jax.enorm(optax.sgd(0.1), graph, check_applied="record"), after)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
  state = tx.init(params)
  for _ in range(2):
    enorm_jax.raise_if_misapplied(state, graph)  # nothing found yet
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match="enorm must be the outermost transformation") as e:
    enorm_jax.raise_if_misapplied(state, graph)
  assert "layers_0/kernel" in str(e.value)
  with pytest.raises(ValueError, match="the state checks 5 leaves, the graph has 7"):
    enorm_jax.raise_if_misapplied(state, enorm_jax.chain_graph(*_mlp(8, depth=3)[1:]))


def test_a_recorded_check_adds_no_control_flow_and_passes_correct_use():
  model, params, names = _mlp(16, depth=3)
  graph = enorm_jax.chain_graph(params, names)
  x = jax.random.normal(jax.random.key(3), (4, 4))
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  compiled = {}
  for mode in (True, "record", False):
    tx = enorm_jax.enorm(optax.adam(1e-2), graph, check_applied=mode)
    step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
    compiled[mode] = step.lower(params, tx.init(params)).compile().as_text()
    p, state = params, tx.init(params)
    for _ in range(4):
      updates, state = step(p, state)
      p = optax.apply_updates(p, updates)
    enorm_jax.raise_if_misapplied(state, graph)
    assert not np.any(state.mismatched)
    assert state.mismatched.shape == ((7,) if mode else (0,))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p))
  conditionals = {mode: len(re.findall(r"\bconditional\(", hlo)) for mode, hlo in compiled.items()}
  # The balance has its own (float32 overflow fallbacks); the raising check adds one.
  assert conditionals[True] == conditionals[False] + 1 == conditionals["record"] + 1
  assert "custom-call(" in compiled[True] and "custom-call(" not in compiled["record"]
  with pytest.raises(ValueError, match="check_applied must be True, False or 'record'"):
    enorm_jax.enorm(optax.sgd(0.1), graph, check_applied="raise")


def test_the_check_keeps_a_donated_step_fast():
  """No side effects (jit keeps its fast dispatch path) and no copy of donated params."""
  model, params, names = _mlp(64, depth=3)
  graph = enorm_jax.chain_graph(params, names)
  x = jax.random.normal(jax.random.key(3), (4, 4))
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  tx = enorm_jax.enorm(optax.sgd(0.1), graph)

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  assert not jax.make_jaxpr(step)(params, state).effects
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile().as_text()
  kernel_copies = [line for line in hlo.splitlines()
                   if re.search(r"f32\[64,64\]\{[0-9,]*\} copy\(", line)]
  assert not kernel_copies, kernel_copies


def test_outermost_enorm_and_wrappers_pass_the_check():
  model, params, names = _mlp(8)
  graph = enorm_jax.chain_graph(params, names)
  x = jax.random.normal(jax.random.key(3), (4, 4))
  grads = lambda p: jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(p)
  for tx in (enorm_jax.enorm(optax.adam(1e-2), graph, c=1.2),
             optax.MultiSteps(enorm_jax.enorm(optax.sgd(0.1), graph), every_k_schedule=2),
             optax.apply_if_finite(enorm_jax.enorm(optax.sgd(0.1), graph), 3),
             enorm_jax.enorm(optax.sgd(0.1), graph, every_k=2)):
    p, state = params, tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: tx.update(grads(p), s, p))
    for _ in range(5):
      updates, state = step(p, state)
      p = optax.apply_updates(p, updates)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p))
    assert float(sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(
        jax.tree.leaves(p), jax.tree.leaves(params)))) > 0  # the params did move
  # Without the check, the same chain runs (the user takes responsibility): the
  # halved updates move the params halfway to what enorm returned, no error.
  tx = optax.chain(enorm_jax.enorm(optax.sgd(0.1), graph, check_applied=False),
                   optax.scale(0.5))
  plain = enorm_jax.enorm(optax.sgd(0.1), graph, check_applied=False)
  updates, _ = tx.update(grads(params), tx.init(params), params)
  full, _ = plain.update(grads(params), plain.init(params), params)
  for half, whole in zip(jax.tree.leaves(updates), jax.tree.leaves(full)):
    np.testing.assert_allclose(half, 0.5 * whole, rtol=1e-6, atol=1e-7)
  state = tx.init(params)
  p = optax.apply_updates(params, updates)
  for _ in range(2):
    updates, state = tx.update(grads(p), state, p)
    p = optax.apply_updates(p, updates)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p))
