"""`trace_graph` and `check_graph` on small functions and on the paper's models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import enorm_jax
from enorm_jax import Entry, Group, RescalingGraph
from enorm_jax.models import CifarNV, FullyConnected, ResNet18C

KEY = jax.random.key(0)


def canonical(graph, params):
  """Groups as comparable tuples of resolved entries (axis spellings normalized)."""
  def entries(rs):
    return sorted((r.path, r.view, r.axes, r.offset) for r in rs)
  return [(g.size, entries(g.producers), entries(g.consumers), entries(g.biases),
           entries(g.carried)) for g in graph.resolve(enorm_jax.leaves_by_path(params))]


def linen_fn(model):
  return lambda p, x: model.apply({"params": p}, x)


PAPER = {
    "fc": (FullyConnected(depth=3, width=16), (1, 32, 32, 3)),
    "cifar_nv": (CifarNV(width=0.25), (1, 28, 28, 3)),
    "resnet18c_cifar": (ResNet18C(stem="cifar", num_classes=10, widths=(8, 8, 16, 16)),
                        (1, 16, 16, 3)),
    "resnet18c_imagenet": (ResNet18C(widths=(8, 8, 16, 16)), (1, 64, 64, 3)),
}


# Slow: the ImageNet stem, and CIFAR-NV (a plain conv chain, as in test_graph's chains).
@pytest.mark.parametrize("name", [n if n not in ("resnet18c_imagenet", "cifar_nv") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(PAPER)])
def test_traced_graph_equals_hand_declared_graph(name):
  model, shape = PAPER[name]
  x = jax.random.normal(KEY, shape)
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda v: v + 0.05, params)
  traced = enorm_jax.trace_graph(linen_fn(model), params, x)
  hand = model.rescaling_graph(params)
  assert canonical(traced, params) == canonical(hand, params)
  a, _ = enorm_jax.balance(params, traced, cycles=2)
  b, _ = enorm_jax.balance(params, hand, cycles=2)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  xs = jax.random.normal(jax.random.key(2), (3,) + shape[1:])
  enorm_jax.check_graph(linen_fn(model), params, traced, xs)


class FlattenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(5, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(7)(x))
    return nn.Dense(3)(x)


class GroupedCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x))
    x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=8)(x))  # depthwise, multiplier 2
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3)(x)


class ConcatNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = nn.Dense(4, name="a")(x)
    b = nn.Dense(3, name="b")(x)
    h = nn.relu(jnp.concatenate([a, b], axis=-1))
    return nn.Dense(2, name="out")(h)


class IdentityResNet(nn.Module):
  """A standard ResNet stage with identity shortcuts and BatchNorm (eval mode)."""

  width: int = 4
  blocks: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: nn.BatchNorm(use_running_average=not train)
    x = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    for _ in range(self.blocks):
      y = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
      y = bn()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
      x = nn.relu(x + y)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class TanhLayerNormNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8, name="Dense_0")(x))
    x = nn.relu(nn.Dense(8, name="Dense_1")(x))
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(8, name="Dense_2")(x))
    return nn.Dense(2, name="Dense_3")(x)


@pytest.mark.parametrize("module,shape,units", [
    (FlattenCNN(), (1, 8, 8, 3), 6 + 5 + 7),
    (GroupedCNN(), (1, 6, 6, 3), 8 + 8 + 16),
    (ConcatNet(), (1, 5), 4 + 3),
])
def test_linen_models_unit_counts_and_checks(module, shape, units):
  x = jax.random.normal(KEY, shape)
  params = module.init(jax.random.key(1), x)["params"]
  graph = enorm_jax.trace_graph(linen_fn(module), params, x)
  assert graph.num_units == units
  xs = jax.random.normal(jax.random.key(3), (4,) + shape[1:])
  enorm_jax.check_graph(linen_fn(module), params, graph, xs)
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  y = linen_fn(module)(params, xs)
  np.testing.assert_allclose(linen_fn(module)(balanced, xs), y, rtol=1e-4, atol=1e-5)


def test_concat_gives_two_groups_with_offsets():
  x = jnp.ones((1, 5))
  params = ConcatNet().init(KEY, x)["params"]
  graph = enorm_jax.trace_graph(linen_fn(ConcatNet()), params, x)
  assert sorted(g.size for g in graph) == [3, 4]
  offsets = sorted(g.consumers[0].offset for g in graph)
  assert offsets == [0, 4]


def test_identity_resnet_with_eval_batchnorm():
  model = IdentityResNet()
  x = jax.random.normal(KEY, (1, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.uniform(KEY, v.shape), variables)
  fn = lambda v, x: model.apply(v, x)
  graph = enorm_jax.trace_graph(fn, variables, x)
  # stem conv, merged residual stream, and per block conv1, BN1 and conv2 groups.
  assert graph.num_units == 4 * (2 + 3 * 2)
  stream = max(graph, key=lambda g: len(g.producers))
  assert len(stream.producers) == 3 and len(stream.consumers) == 3
  assert any(g.carried for g in graph)  # running means move with their units
  xs = jax.random.normal(jax.random.key(2), (4, 6, 6, 3))
  enorm_jax.check_graph(fn, variables, graph, xs)
  # Train-mode BN: the units feeding a BN have a free scale; they are excluded.
  train_fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
  report = enorm_jax.explain_graph(train_fn, variables, x)
  assert report.graph.num_units < graph.num_units
  enorm_jax.check_graph(train_fn, variables, report.graph, xs)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(6, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
    return self.fc2(jax.nn.relu(self.fc1(x)))


def test_nnx_model_paths_match_optimizer_tree():
  model = NnxNet(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(KEY, (1, 5, 5, 3))
  fn = lambda p, x: nnx.merge(graphdef, p)(x)
  graph = enorm_jax.trace_graph(fn, params, x)
  assert graph.num_units == 6 + 8
  assert {e.path for g in graph for e in g.producers} == {"conv/kernel", "fc1/kernel"}
  enorm_jax.check_graph(fn, params, graph, jax.random.normal(KEY, (3, 5, 5, 3)))


def test_tanh_and_layernorm_are_reported():
  model = TanhLayerNormNet()
  x = jnp.ones((1, 4))
  params = model.init(KEY, x)["params"]
  report = enorm_jax.explain_graph(linen_fn(model), params, x)
  # The LayerNorm's gain (with its bias) against Dense_2, and Dense_2's outputs;
  # the same with one example as with many (the batch axis is a broadcast).
  assert [g.size for g in report.graph] == [8, 8]
  assert report.graph.groups[0].producers[0].path == "LayerNorm_0/scale"
  text = report.describe()
  assert "Dense_0 outputs" in text and "tanh" in text
  assert "Dense_1 outputs" in text and "square" in text  # LayerNorm's variance
  enorm_jax.check_graph(linen_fn(model), params, report.graph,
                        jax.random.normal(KEY, (4, 4)))


# --- one small numeric test per primitive rule ---------------------------------

def _w(*shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.5 + 0.1


@jax.custom_vjp
def _custom_vjp_relu(x):
  return jnp.maximum(x, 0)


_custom_vjp_relu.defvjp(lambda x: (_custom_vjp_relu(x), x), lambda x, g: (g * (x > 0),))


def _params2(shape_a, shape_b):
  return {"a": _w(*shape_a), "ab": _w(shape_a[-1], seed=1), "b": _w(*shape_b, seed=2)}


PRIMITIVE_CASES = {
    # name: (fn(p, x), params, x shape, expected units)
    "relu_max": (lambda p, x: jnp.maximum(x @ p["a"] + p["ab"], 0) @ p["b"],
                 _params2((3, 4), (4, 2)), (2, 3), 4),
    "leaky_relu_select": (lambda p, x: jax.nn.leaky_relu(x @ p["a"]) @ p["b"],
                          _params2((3, 4), (4, 2)), (2, 3), 4),
    "mul_positive_const": (lambda p, x: (2.5 * jax.nn.relu(x @ p["a"])) @ p["b"],
                           _params2((3, 4), (4, 2)), (2, 3), 4),
    "transpose_dot_lhs_kernel": (lambda p, x: (p["b"].T @ jax.nn.relu(p["a"].T @ x.T)).T,
                                 _params2((3, 4), (4, 2)), (2, 3), 4),
    "slice": (lambda p, x: jax.nn.relu(x @ p["a"])[:, 1:3] @ p["b"][:2],
              {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 2),
    "pad": (lambda p, x: jnp.pad(jax.nn.relu(x @ p["a"]), ((0, 0), (1, 1))) @ p["b"],
            {"a": _w(3, 4), "b": _w(6, 2)}, (2, 3), 4),
    "concatenate_self": (lambda p, x: jnp.concatenate(
        [jax.nn.relu(x @ p["a"])] * 2, axis=-1) @ p["b"],
        {"a": _w(3, 4), "b": _w(8, 2)}, (2, 3), 4),  # rows u and u + 4 of b
    "residual_add": (lambda p, x: jax.nn.relu(x @ p["a"] + x @ p["s"]) @ p["b"],
                     {"a": _w(3, 4), "s": _w(3, 4, seed=5), "b": _w(4, 2)}, (2, 3), 4),
    "jit": (lambda p, x: jax.jit(jax.nn.relu)(x @ p["a"]) @ p["b"],
            {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
    "remat": (lambda p, x: jax.checkpoint(lambda h: jax.nn.relu(h))(x @ p["a"]) @ p["b"],
              {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
    "custom_vjp_in_jit_in_remat": (lambda p, x: jax.checkpoint(jax.jit(
        lambda h, w: _custom_vjp_relu(h @ w)))(x, p["a"]) @ p["b"],
        {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
    "flatten_nchw": (lambda p, x: jax.nn.relu(jnp.einsum("nhwc,co->nohw", x, p["a"]))
                     .reshape(x.shape[0], -1) @ p["b"],
                     {"a": _w(2, 3), "b": _w(3 * 4 * 4, 2)}, (2, 4, 4, 2), 3),
    "tanh_stops": (lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"],
                   {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 0),
    "square_stops": (lambda p, x: (x @ p["a"]) ** 2 @ p["b"],
                     {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 0),
    "nonzero_threshold_stops": (lambda p, x: jnp.maximum(x @ p["a"], 0.5) @ p["b"],
                                {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 0),
    "softmax_over_units_stops": (lambda p, x: jax.nn.softmax(x @ p["a"]) @ p["b"],
                                 {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 0),
}


PRIMITIVE_CASES.update({
    # Reversing the units themselves is a permutation an Entry cannot express (0
    # units: missed, never wrong); reversing a spatial axis keeps them.
    "rev_units": (lambda p, x: jnp.flip(jax.nn.relu(x @ p["a"]), axis=-1) @ p["b"],
                  {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 0),
    "rev_spatial": (lambda p, x: jnp.flip(jax.nn.relu(jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))), axis=1)
        .reshape(x.shape[0], -1) @ p["b"], {"k": _w(3, 3, 2, 5), "b": _w(4 * 4 * 5, 2)},
        (2, 4, 4, 2), 5),
    "neg_min": (lambda p, x: -jnp.minimum(-(x @ p["a"]), 0) @ p["b"],
                {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
    "abs": (lambda p, x: jnp.abs(x @ p["a"]) @ p["b"], {"a": _w(3, 4), "b": _w(4, 2)},
            (2, 3), 4),
    "convert_element_type": (lambda p, x: jax.nn.relu(x @ p["a"]).astype(jnp.bfloat16)
                             .astype(jnp.float32) @ p["b"],
                             {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4, 1e-2),  # bf16 rounding
    "squeeze_expand_dims": (lambda p, x: jnp.squeeze(jnp.expand_dims(
        jax.nn.relu(x @ p["a"]), 1), 1) @ p["b"], {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
    "global_max_pool": (lambda p, x: jnp.max(jax.nn.relu(
        jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))),
        axis=(1, 2)) @ p["b"], {"k": _w(3, 3, 2, 5), "b": _w(5, 2)}, (2, 6, 6, 2), 5),
    "avg_pool_window_sum": (lambda p, x: nn.avg_pool(jax.nn.relu(
        jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))),
        (2, 2), (2, 2)).reshape(x.shape[0], -1) @ p["b"],
        {"k": _w(3, 3, 2, 5), "b": _w(3 * 3 * 5, 2)}, (2, 6, 6, 2), 5),
    "conv_nchw_oihw": (lambda p, x: jnp.mean(jax.nn.relu(jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))),
        axis=(2, 3)) @ p["b"], {"k": _w(5, 2, 3, 3), "b": _w(5, 2)}, (2, 2, 6, 6), 5),
    "sign_select": (lambda p, x: jnp.where(jnp.sign(x @ p["a"]) > 0, x @ p["a"], 0.0) @ p["b"],
                    {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4),
})


@jax.custom_vjp
def _custom_relu(x):
  return jnp.maximum(x, 0)


_custom_relu.defvjp(lambda x: (_custom_relu(x), x), lambda x, g: (g * (x > 0),))
PRIMITIVE_CASES["custom_vjp"] = (lambda p, x: _custom_relu(x @ p["a"]) @ p["b"],
                                 {"a": _w(3, 4), "b": _w(4, 2)}, (2, 3), 4)


@pytest.mark.parametrize("name", sorted(PRIMITIVE_CASES))
def test_primitive_rules(name):
  fn, params, shape, units, *rtol = PRIMITIVE_CASES[name]
  x = jax.random.normal(KEY, shape)
  graph = enorm_jax.trace_graph(fn, params, x)
  assert graph.num_units == units
  if units:
    enorm_jax.check_graph(fn, params, graph, jax.random.normal(jax.random.key(4), shape),
                          rtol=rtol[0] if rtol else 1e-4)


def test_register_rule_extends_the_tracer():
  def fn(p, x):
    return jax.nn.relu6(x @ p["a"]) @ p["b"]  # relu6 = min(relu(x), 6): not rescalable
  params = {"a": _w(3, 4), "b": _w(4, 2)}
  x = jnp.ones((1, 3))
  assert enorm_jax.trace_graph(fn, params, x).num_units == 0
  # A user rule extends the tracer: a cumulative sum over the batch axis commutes
  # with per-unit scaling, so its tags pass through.
  cumsum = lambda p, x: jax.lax.cumsum(x @ p["a"], axis=0) @ p["b"]
  assert enorm_jax.trace_graph(cumsum, params, x).num_units == 0
  previous_cumsum = enorm_jax.register_rule("cumsum", lambda state, eqn, tags: [tags[0]])
  # A wrong rule (`sin` is not transparent) is caught by the tracer's own check.
  previous = enorm_jax.register_rule("sin", lambda tr, eqn, tags: [tags[0]])
  try:
    assert enorm_jax.trace_graph(cumsum, params, x).num_units == 4
    report = enorm_jax.explain_graph(lambda p, x: jnp.sin(x @ p["a"]) @ p["b"], params, x)
    assert report.graph.num_units == 0
    assert any("changes the function's output" in line for line in report.stopped)
  finally:
    enorm_jax.register_rule("sin", previous)
    enorm_jax.register_rule("cumsum", previous_cumsum)
  assert enorm_jax.trace_graph(lambda p, x: jnp.sin(x @ p["a"]) @ p["b"], params, x,
                               ).num_units == 0


# --- check_graph catches wrong graphs -------------------------------------------

def test_check_graph_catches_missing_bias():
  model, shape = PAPER["fc"]
  x = jax.random.normal(KEY, (4,) + shape[1:])
  params = model.init(KEY, x)["params"]
  hand = model.rescaling_graph(params)
  g0 = hand.groups[1]
  wrong = RescalingGraph((hand.groups[0], Group(g0.size, g0.producers, g0.consumers,
                                                name="no bias")) + hand.groups[2:])
  with pytest.raises(ValueError, match=r"'no bias'.*Dense_1/kernel"):
    enorm_jax.check_graph(linen_fn(model), params, wrong, x)


def test_check_graph_catches_wrong_flatten_order():
  model = FlattenCNN()
  x = jax.random.normal(KEY, (4, 8, 8, 3))
  params = model.init(KEY, x)["params"]
  graph = enorm_jax.trace_graph(linen_fn(model), params, x)
  g = graph.groups[1]
  rows = params["Dense_0"]["kernel"].shape[0]
  wrong_entry = Entry("Dense_0/kernel", 0, view=(5, rows // 5, 7))  # channel-major: wrong
  wrong = RescalingGraph((graph.groups[0], Group(g.size, g.producers, (wrong_entry,),
                                                 biases=g.biases, name="flatten"))
                         + graph.groups[2:])
  with pytest.raises(ValueError, match="'flatten'"):
    enorm_jax.check_graph(linen_fn(model), params, wrong, x)


def test_check_graph_catches_unscaled_skip_branch():
  model, shape = PAPER["resnet18c_cifar"]
  x = jax.random.normal(KEY, (2,) + shape[1:])
  params = model.init(KEY, x)["params"]
  hand = model.rescaling_graph(params)
  i = next(k for k, g in enumerate(hand) if len(g.producers) == 2)
  g = hand.groups[i]
  wrong = RescalingGraph(hand.groups[:i] + (Group(g.size, g.producers[:1], g.consumers,
                                                  biases=g.biases[:1], name="no skip"),)
                         + hand.groups[i + 1:])
  with pytest.raises(ValueError, match="'no skip'"):
    enorm_jax.check_graph(linen_fn(model), params, wrong, x)


def test_check_graph_catches_batchnorm_treated_as_transparent():
  model = FullyConnected(depth=2, width=8, norm="batch")
  x = jax.random.normal(KEY, (4, 12))
  variables = model.init(KEY, x)
  fn = lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
  params = variables["params"]
  wrong = enorm_jax.chain_graph(params, ["Dense_0", "Dense_1", "Dense_2", "Dense_3"])
  with pytest.raises(ValueError, match="does not preserve"):
    enorm_jax.check_graph(fn, params, wrong, x)
  # The tracer does not make that mistake: no group crosses a BN. What it finds
  # is exact: each BN's scale and bias against the next layer's rows.
  graph = enorm_jax.trace_graph(fn, params, x)
  assert [[e.path for e in g.producers] for g in graph] == [
      [f"Norm_{i}/BatchNorm_0/scale"] for i in range(3)]
  enorm_jax.check_graph(fn, params, graph, x)


def test_check_graph_reports_dead_units():
  params = {"a": _w(3, 4), "b": _w(4, 2)}
  params["a"] = params["a"].at[:, 2].set(-10.0)  # unit 2 is negative on positive inputs
  fn = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
  graph = enorm_jax.trace_graph(fn, params, jnp.ones((1, 3)))
  report = enorm_jax.check_graph(fn, params, graph, jnp.abs(jax.random.normal(KEY, (5, 3))))
  assert list(report.unexercised.values()) == [[2]]
