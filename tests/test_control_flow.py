"""Control flow inside the traced function: a `fori_loop` over stacked layers, a
`cond` between two paths, a `while_loop` whose trip count is data-dependent. A
group found inside holds on every path; a unit that does not is left out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

LAYERS, D = 3, 8


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return {"inp": jax.random.normal(keys[0], (5, D)) / 2,
          "layers": jax.random.normal(keys[1], (LAYERS, D, D)) / 3,
          "out": jax.random.normal(keys[2], (D, 2)) / 3}


def _x():
  return jax.random.normal(jax.random.key(9), (4, 5))


def _preserved(fn, params, graph, x):
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)
  enorm_jax.check_graph(fn, params, graph, x)


def test_fori_loop_over_stacked_layers_gives_each_layer_its_units():
  def fn(p, x):
    h = jax.nn.relu(x @ p["inp"])
    h = jax.lax.fori_loop(0, LAYERS, lambda i, h: jax.nn.relu(h @ p["layers"][i]), h)
    return h @ p["out"]
  params = _params()
  graph = enorm_jax.trace_graph(fn, params, _x())
  assert graph.num_units == (LAYERS + 1) * D
  # Layer l's columns against layer l + 1's rows: one group per step, since one
  # leaf's element may not serve two units of a group.
  assert [g.size for g in graph] == [D] * (LAYERS + 1)
  assert sorted(e.path for g in graph for e in g.consumers) == ["layers"] * LAYERS + ["out"]
  _preserved(fn, params, graph, _x())


def test_cond_ties_the_units_of_its_branches():
  def fn(p, x, first):
    h = jax.nn.relu(x @ p["inp"])
    h = jax.lax.cond(first, lambda h: jax.nn.relu(h @ p["a"]), lambda h: jax.nn.relu(h @ p["b"]),
                     h)
    return h @ p["out"]
  params, x = _params(), _x()
  params = {"inp": params["inp"], "a": params["layers"][0], "b": params["layers"][1],
            "out": params["out"]}
  graph = enorm_jax.trace_graph(fn, params, x, True)
  # inp's units are read by a and b; a's and b's units are one factor per unit,
  # whichever branch runs.
  assert [(sorted(e.path for e in g.producers), sorted(e.path for e in g.consumers))
          for g in graph] == [(["inp"], ["a", "b"]), (["a", "b"], ["out"])]
  for first in (True, False):
    balanced, _ = enorm_jax.balance(params, graph, cycles=3)
    np.testing.assert_allclose(fn(balanced, x, first), fn(params, x, first), rtol=1e-4,
                               atol=1e-5)
    enorm_jax.check_graph(fn, params, graph, x, first)


def test_cond_with_a_path_that_keeps_the_units_is_weight_sharing():
  def fn(p, x, halve):
    h = jax.nn.relu(x @ p["inp"])
    h = jax.lax.cond(halve, lambda h: 0.5 * h, lambda h: jax.nn.relu(h @ p["layers"][0]), h)
    return h @ p["out"]
  report = enorm_jax.explain_graph(fn, _params(), _x(), True)
  # Both paths give one factor per unit only if layers[0] maps units to themselves.
  assert report.graph.num_units == 0
  assert any("both produces and consumes" in line for line in report.stopped)


@pytest.mark.parametrize("whole_leaf", [True, False])
def test_while_loop_applying_one_kernel_repeatedly(whole_leaf):
  """A kernel applied an unknown number of times reads and writes the same units:
  a recurrent kernel. As a whole square leaf it is balanced as one; as a slice of
  a stacked leaf it is left out with its reason, never returned wrong."""
  params, x = _params(), _x()
  params["shared"] = params["layers"][0]
  kernel = (lambda p: p["shared"]) if whole_leaf else (lambda p: p["layers"][0])

  def fn(p, x):
    h = jax.nn.relu(x @ p["inp"])
    def body(carry):
      h, i = carry
      return jax.nn.relu(h @ kernel(p)), i + 1
    h, _ = jax.lax.while_loop(lambda c: c[1] < 3, body, (h, 0))
    return h @ p["out"]
  report = enorm_jax.explain_graph(fn, params, x)
  if whole_leaf:
    (group,) = report.graph.groups
    assert [e.path for e in group.producers] == ["inp", "shared"]
    assert [e.path for e in group.consumers] == ["shared", "out"]
    balanced, _ = enorm_jax.balance(params, report.graph, cycles=3)
    np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)
  else:
    assert report.graph.num_units == 0
    assert any("both produces and consumes" in line for line in report.stopped)


def test_while_loop_with_a_zero_initial_state_carries_the_units():
  def fn(p, x):
    h = jax.nn.relu(x @ p["inp"])
    def body(carry):
      s, i = carry
      return s + 0.5 * h, i + 1
    s, _ = jax.lax.while_loop(lambda c: c[1] < 3, body, (jnp.zeros_like(h), 0))
    return s @ p["out"]
  params, x = _params(), _x()
  graph = enorm_jax.trace_graph(fn, params, x)
  assert graph.num_units == D
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)  # (no gradient of a while loop)
  np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)
