"""`explain_graph` accounts for every kernel-like parameter, with the
user's line; an empty graph says why."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

KEY = jax.random.key(0)


class StdConv(nn.Conv):
  """A conv whose kernel is standardised before use (as in BiT)."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == "kernel":
      value = (value - value.mean(axis=(0, 1, 2))) / (value.std(axis=(0, 1, 2)) + 1e-5)
    return value


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(StdConv(4, (3, 3))(x))
    x = nn.relu(nn.WeightNorm(nn.Conv(4, (3, 3)))(x))
    x = nn.relu(nn.Conv(5, (3, 3))(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(2)(x.mean((1, 2)))


def _explain(model, variables, x, **kwargs):
  fn = lambda v, x: model.apply(v, x, **kwargs)
  return enorm_jax.explain_graph(fn, variables, x)


def test_every_kernel_is_in_the_graph_or_explained_at_the_users_line():
  model, x = Mixed(), jnp.ones((1, 6, 6, 3))
  variables = model.init(KEY, x)
  report = _explain(model, variables, x)
  text = "\n".join(report.stopped)
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  paths = ["/".join(str(k.key) for k in kp) for kp, v in flat
           if np.ndim(v) >= 2 or kp[-1].key == "scale"]
  in_graph = {e.path for g in report.graph for e in g.producers + g.consumers + g.carried}
  for path in paths:
    assert path in in_graph or path in text or path.rsplit("/", 1)[0] in text, path
  assert "StdConv_0/kernel" in text and "reduce" in text
  assert "WeightNorm" in text
  # Locations name this file, with the flax internal as a detail.
  assert __file__ in text and "inside" in text and "flax" in text


def test_no_rescalable_units_warns_with_the_reasons():
  model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(2)])
  x = jnp.ones((1, 3))
  params = model.init(KEY, x)["params"]
  with pytest.warns(UserWarning, match="(?s)no rescalable units.*layers_0 outputs"):
    graph = enorm_jax.trace_graph(lambda p, x: model.apply({"params": p}, x), params, x)
  assert len(graph) == 0
  as_int = jax.tree.map(lambda v: v.astype(jnp.int32), params)
  apply_int = lambda p, x: model.apply({"params": jax.tree.map(jnp.float32, p)}, x)
  with pytest.warns(UserWarning, match="layers_0/kernel: has dtype int32"):
    enorm_jax.trace_graph(apply_int, as_int, x)


class BnNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(4, (3, 3))(x)
    return nn.Dense(2)(x.mean((1, 2)))


def _accounted(report, path):
  text = "\n".join(report.stopped)
  in_graph = {e.path for g in report.graph for e in g.producers + g.consumers + g.carried}
  return path in in_graph or path in text or f"{path.rsplit('/', 1)[0]} outputs" in text


def test_batchnorm_scales_with_closed_over_statistics_or_under_vmap_are_accounted_for():
  model, x = BnNet(), jnp.ones((2, 6, 6, 3))
  variables = model.init(KEY, x)
  stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
  closed = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
  train = lambda p, x: jax.vmap(lambda xi: model.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, xi[None], train=True,
      mutable=["batch_stats"])[0])(x)
  for fn in (closed, train):
    report = enorm_jax.explain_graph(fn, variables["params"], x)
    for path in ("Conv_0/kernel", "BatchNorm_0/scale", "Conv_1/kernel", "Dense_0/kernel"):
      assert _accounted(report, path), (path, report)


def test_attention_values_and_output_projection_form_a_group():
  class Attend(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8)(x))
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
  model = Attend()
  x = jax.random.normal(KEY, (3, 5, 4))
  params = model.init(KEY, x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  graph = enorm_jax.trace_graph(apply, params, x[:1])
  value = [g for g in graph if "value" in g.producers[0].path]
  assert len(value) == 1 and value[0].size == 8
  assert value[0].consumers[0].path.endswith("out/kernel")
  enorm_jax.check_graph(apply, params, graph, x)
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  np.testing.assert_allclose(apply(balanced, x), apply(params, x), rtol=1e-5, atol=1e-6)


def test_the_graph_does_not_depend_on_the_example_batch():
  """A LayerNorm after global pooling reads each gain once per example: with one
  example its gain is still a per-feature gain (the batch axis is a broadcast)."""
  class Pooled(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x)).mean((1, 2))
      return nn.Dense(3)(nn.LayerNorm()(x))

  model = Pooled()
  params = model.init(jax.random.key(1), jnp.ones((1, 6, 6, 3)))["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  graphs = [enorm_jax.trace_graph(fn, params, jax.random.normal(jax.random.key(0),
                                                                 (b, 6, 6, 3)))
            for b in (1, 2, 5)]
  assert graphs[0] == graphs[1] == graphs[2] and graphs[0].num_units == 8


class ConvNeXtBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = nn.Conv(dim, (7, 7), padding="SAME", feature_group_count=dim, name="dw")(x)
    h = nn.LayerNorm(epsilon=1e-6, name="norm")(h)
    h = nn.Dense(dim, name="pw2")(nn.gelu(nn.Dense(4 * dim, name="pw1")(h)))
    return x + self.param("gamma", nn.initializers.constant(1e-6), (dim,)) * h


class ConvNeXt(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(nn.Conv(16, (4, 4), strides=(4, 4))(x))
    x = ConvNeXtBlock(name="block1")(ConvNeXtBlock(name="block0")(x))
    return nn.Dense(10, name="head")(nn.LayerNorm(name="final_norm")(x.mean(axis=(1, 2))))


def test_a_convnext_gives_the_same_units_at_batch_1_and_2():
  """Per block: the norm's gain against pw1's rows, pw2's outputs against the layer
  scale; then the final norm against the head: 5 x 16 units at any batch."""
  model, x = ConvNeXt(), jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = model.init(jax.random.key(0), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  one, two = (enorm_jax.trace_graph(fn, params, x[:b]) for b in (1, 2))
  assert one == two and one.num_units == 80
  assert [e.path for g in one for e in g.consumers] == [
      "block0/pw1/kernel", "block0/gamma", "block1/pw1/kernel", "block1/gamma", "head/kernel"]
  rng = np.random.default_rng(0)
  factors = [np.exp(rng.normal(size=g.size)).astype(np.float32) for g in one]
  np.testing.assert_allclose(fn(enorm_jax.rescale(params, factors, one), x), fn(params, x),
                             rtol=1e-4, atol=1e-5)
  balanced, _ = enorm_jax.balance(params, one, cycles=3)
  np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)
