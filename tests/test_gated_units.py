"""Gated MLPs: in ``down(act(gate(x)) * up(x))`` column j of ``up`` against row j of
``down`` is exact for any ``act``, because the product is linear in the up branch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

WIDTH, HIDDEN = 16, 32


class GatedMLP(nn.Module):
  """A residual block ``x + down(act(gate(x)) * up(x))`` between two dense layers."""

  act: str

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="inp")(x)
    if self.act == "glu":  # jax.nn.glu: one projection, split in halves a * sigmoid(b)
      h = jax.nn.glu(nn.Dense(2 * HIDDEN, use_bias=False, name="up")(x))
    else:
      act = {"silu": nn.silu, "gelu_tanh": nn.gelu,
             "gelu_erf": lambda v: nn.gelu(v, approximate=False),
             "hand": lambda v: v / (1 + jnp.exp(-v))}[self.act]
      gate = act(nn.Dense(HIDDEN, use_bias=False, name="gate")(x))
      h = gate * nn.Dense(HIDDEN, use_bias=False, name="up")(x)
    x = x + nn.Dense(WIDTH, use_bias=False, name="down")(h)
    return nn.Dense(4, name="head")(x)


def _traced(act):
  model, x = GatedMLP(act), jax.random.normal(jax.random.key(1), (8, 6))
  params = model.init(jax.random.key(0), x)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  return fn, params, x, enorm_jax.explain_graph(fn, params, x)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu_erf", "hand", "glu"])
def test_the_up_branch_is_a_unit_whatever_the_gate(act):
  fn, params, x, report = _traced(act)
  up = [g for g in report.graph if g.producers[0].path == "up/kernel"]
  assert len(up) == 1 and up[0].size == HIDDEN, report
  assert [e.path for e in up[0].consumers] == ["down/kernel"]
  assert not any(e.path == "gate/kernel" for g in report.graph for e in g.producers)
  # By hand: column j of up times d_j, row j of down divided by d_j.
  d = np.exp(np.random.default_rng(0).normal(size=HIDDEN)).astype(np.float32)
  moved = jax.tree.map(lambda a: a, params)
  moved["up"]["kernel"] = params["up"]["kernel"].at[:, :HIDDEN].multiply(d)
  moved["down"]["kernel"] = params["down"]["kernel"] / d[:, None]
  np.testing.assert_allclose(fn(moved, x), fn(params, x), rtol=1e-5, atol=1e-5)
  balanced, _ = enorm_jax.balance(params, report.graph, cycles=5)
  np.testing.assert_allclose(fn(balanced, x), fn(params, x), rtol=1e-4, atol=1e-5)


def test_the_gate_branch_is_not_a_unit_and_says_where():
  _, _, _, report = _traced("silu")
  line = next(s for s in report.stopped if s.startswith("gate outputs"))
  assert "logistic" in line and "test_gated_units.py" in line, line
