"""`RescalingGraph` construction, validation and `chain_graph`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import enorm_jax
from enorm_jax import Entry, Group, RescalingGraph
from tests.chains import mlp_params, relative_error


def two_layer_graph(**consumer_kwargs):
  return RescalingGraph((Group(4, (Entry("Dense_0/kernel", 1, bias="Dense_0/bias"),),
                               (Entry("Dense_1/kernel", 0, **consumer_kwargs),), name="hidden"),))


def test_graph_is_hashable_and_static():
  a, b = two_layer_graph(), two_layer_graph()
  assert a == b and hash(a) == hash(b)
  assert {a: 1}[b] == 1
  params = mlp_params([3, 4, 2])
  out = jax.jit(lambda p: enorm_jax.balance(p, a)[0])(params)
  assert jax.tree.structure(out) == jax.tree.structure(params)


@pytest.mark.parametrize("graph,match", [
    (RescalingGraph((Group(4, (Entry("Dense_0/kernel", 1),), (Entry("Dense_9/kernel", 0),)),)),
     r"'Dense_9/kernel' is not in the params"),
    (RescalingGraph((Group(4, (Entry("Dense_0/kernel", 5),), (Entry("Dense_1/kernel", 0),)),)),
     r"axis 5 is out of range for shape \(3, 4\)"),
    (RescalingGraph((Group(5, (Entry("Dense_0/kernel", 1),), (Entry("Dense_1/kernel", 0),)),)),
     r"'Dense_0/kernel' \(shape \(3, 4\).*expected size 5, got 4"),
    (RescalingGraph((Group(4, (Entry("Dense_0/kernel", 1),),
                           (Entry("Dense_1/kernel", 0, view=(3, 3)),)),)),
     r"'Dense_1/kernel' has shape \(4, 2\).*views it as \(3, 3\)"),
    (RescalingGraph((Group(4, (Entry("Dense_0/kernel", 1, bias="Dense_1/kernel"),),
                           (Entry("Dense_1/kernel", 0),)),)),
     r"bias .Dense_1/kernel. has shape \(4, 2\); a bias read along axis 0 must be 1-D"),
])
def test_mismatched_graph_names_path_and_sizes(graph, match):
  params = mlp_params([3, 4, 2])
  with pytest.raises(ValueError, match=match):
    graph.validate(params)
  with pytest.raises(ValueError, match=match):
    enorm_jax.balance(params, graph)


def test_non_float_parameter_is_rejected():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4), jnp.int32)},
            "Dense_1": {"kernel": jnp.ones((4, 2))}}
  graph = RescalingGraph((Group(4, (Entry("Dense_0/kernel", 1),), (Entry("Dense_1/kernel", 0),)),))
  with pytest.raises(ValueError, match="dtype int32"):
    graph.validate(params)


def test_group_needs_producers_and_consumers():
  with pytest.raises(ValueError, match="at least one producer and one consumer"):
    Group(3, (Entry("a", 0),), ())
  with pytest.raises(ValueError, match="size must be a positive int"):
    Group(0, (Entry("a", 0),), (Entry("b", 0),))
  with pytest.raises(TypeError, match="axis must be"):
    Entry("a", axis="1")


def test_chain_graph_conv_pool_flatten_dense():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(6, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(5, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(7)(x))
      return nn.Dense(3)(x)

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  net = Net()
  params = net.init(jax.random.key(1), x)["params"]
  graph = enorm_jax.chain_graph(params, ["Conv_0", "Conv_1", "Dense_0", "Dense_1"])
  assert [g.size for g in graph] == [6, 5, 7]
  flat = graph.groups[1].consumers[0]
  assert flat.view == (4, 5, 7) and flat.axis == 1
  scales = tuple(jnp.exp(jax.random.normal(jax.random.key(i), (g.size,)))
                 for i, g in enumerate(graph))
  y = net.apply({"params": params}, x)
  assert relative_error(net.apply({"params": enorm_jax.rescale(params, scales, graph)}, x), y) < 1e-5
  # A channel-major flatten would be a different graph, and it does change the function.
  wrong = RescalingGraph(graph.groups[:1] + (Group(
      5, graph.groups[1].producers, (Entry("Dense_0/kernel", 0, view=(5, 4, 7)),)),)
      + graph.groups[2:])
  assert relative_error(net.apply({"params": enorm_jax.rescale(params, scales, wrong)}, x), y) > 1e-3


def test_chain_graph_errors():
  params = mlp_params([3, 4, 2])
  with pytest.raises(ValueError, match="no parameter 'Dense_7/kernel'"):
    enorm_jax.chain_graph(params, ["Dense_0", "Dense_7"])
  with pytest.raises(ValueError, match="at least two layers"):
    enorm_jax.chain_graph(params, ["Dense_0"])
  bad = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((6, 2))}}
  with pytest.raises(ValueError, match="not a multiple"):
    enorm_jax.chain_graph(bad, ["Dense_0", "Dense_1"])


def test_offsets_and_multi_axis_entries():
  """A concatenation (offsets) and a grouped conv consumer (two combined axes)."""
  key = jax.random.split(jax.random.key(0), 6)
  params = {"a": jax.random.normal(key[0], (3, 4)), "b": jax.random.normal(key[1], (3, 2)),
            # Grouped 1x1 conv: 6 input channels in 2 groups of 3, 4 outputs (2 per group).
            "g": jax.random.normal(key[2], (1, 1, 3, 4))}

  def apply(p, x):
    h = jax.nn.relu(jnp.concatenate([x @ p["a"], x @ p["b"]], axis=-1))  # 6 channels
    h = h[:, None, None, :]
    y = jax.lax.conv_general_dilated(h, p["g"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=2)
    return y[:, 0, 0, :]

  # Channel u of the concat is input i = u % 3 of group u // 3, whose outputs are
  # 2 * (u // 3) + {0, 1}: view the kernel as (1, 1, 3, 2, 2) with unit axes (3, 2).
  graph = RescalingGraph((
      Group(4, (Entry("a", 1),), (Entry("g", (3, 2), view=(1, 1, 3, 2, 2)),)),
      Group(2, (Entry("b", 1),), (Entry("g", (3, 2), view=(1, 1, 3, 2, 2), offset=4),)),
  ))
  x = jax.random.normal(key[3], (5, 3))
  y = apply(params, x)
  scales = (jnp.exp(jax.random.normal(key[4], (4,))), jnp.exp(jax.random.normal(key[5], (2,))))
  assert relative_error(apply(enorm_jax.rescale(params, scales, graph), x), y) < 1e-5
  balanced, _ = enorm_jax.balance(params, graph, cycles=5)
  assert relative_error(apply(balanced, x), y) < 1e-5


def test_phases_colour_a_chain_with_two_colours():
  params = mlp_params([3, 4, 4, 4, 4, 2])
  graph = enorm_jax.chain_graph(params, [f"Dense_{k}" for k in range(5)])
  assert graph.phases == ((0, 2), (1, 3))
  assert graph.heights["Dense_0/kernel"] == 4 and graph.heights["Dense_4/kernel"] == 0


def test_describe_lists_groups():
  text = two_layer_graph().describe()
  assert "'hidden' size=4" in text and "biases:    Dense_0/bias[axis=0]" in text
