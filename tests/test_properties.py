"""Property-based tests over random architectures (hypothesis).

Default: a few examples per property, for CI. For long local runs:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_properties.py
"""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enorm_jax
from enorm_jax.models import ResNet18C

settings.register_profile("ci", max_examples=4, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

balance_jit = jax.jit(enorm_jax.balance, static_argnames=("graph", "cycles", "schedule"))


class ConvChain(nn.Module):
  """Random CNN chain: convs with optional max/avg pooling, flatten, Dense layers."""

  channels: tuple[int, ...]
  pools: tuple[str, ...]
  dense: tuple[int, ...]
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    for c, pool in zip(self.channels, self.pools):
      x = nn.relu(nn.Conv(c, (3, 3), use_bias=self.use_bias)(x))
      if pool == "max":
        x = nn.max_pool(x, (2, 2), (2, 2))
      elif pool == "avg":
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    for i, d in enumerate(self.dense):
      x = nn.Dense(d, use_bias=self.use_bias)(x)
      if i < len(self.dense) - 1:
        x = nn.relu(x)
    return x

  def layers(self):
    return ([f"Conv_{i}" for i in range(len(self.channels))]
            + [f"Dense_{i}" for i in range(len(self.dense))])


@st.composite
def networks(draw):
  """(apply_fn, params, graph, x) for a random MLP, CNN chain or type-C residual stack."""
  kind = draw(st.sampled_from(["mlp", "cnn", "resnet"]))
  seed = draw(st.integers(0, 2 ** 16))
  use_bias = draw(st.booleans())
  if kind == "resnet":
    stages = draw(st.integers(1, 3))
    model = ResNet18C(stem="cifar", num_classes=3, use_bias=use_bias,
                      stage_sizes=(1,) * stages,
                      widths=tuple(draw(st.integers(2, 6)) for _ in range(stages)))
    x = jax.random.normal(jax.random.key(seed), (3, 8, 8, 3))
    params = model.init(jax.random.key(seed + 1), x)["params"]
    graph = model.rescaling_graph(params)
  else:
    if kind == "mlp":
      widths = draw(st.lists(st.integers(2, 8), min_size=2, max_size=5))
      model = ConvChain((), (), tuple(widths), use_bias)
      x = jax.random.normal(jax.random.key(seed), (5, 4, 4, 1))
    else:
      n = draw(st.integers(1, 3))
      model = ConvChain(tuple(draw(st.integers(2, 5)) for _ in range(n)),
                        tuple(draw(st.sampled_from(["none", "max", "avg"])) for _ in range(n)),
                        tuple(draw(st.lists(st.integers(2, 6), min_size=1, max_size=2))),
                        use_bias)
      x = jax.random.normal(jax.random.key(seed), (3, 8, 8, 2))
    params = model.init(jax.random.key(seed + 1), x)["params"]
    graph = enorm_jax.chain_graph(params, model.layers())
  if use_bias:  # non-zero biases make function preservation a real check
    params = jax.tree_util.tree_map_with_path(
        lambda kp, v: v + 0.1 if kp[-1].key == "bias" else v, params)
  apply = lambda p, x: model.apply({"params": p}, x)
  return apply, params, graph, x


def log_scales(graph, seed, spread):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(np.exp(rng.uniform(-spread, spread, g.size)), jnp.float32)
               for g in graph)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


@given(networks(), st.floats(0.0, 20.0), st.integers(0, 1000))
def test_function_preserved_and_energy_monotone(net, spread, seed):
  apply, params, graph, x = net
  start = enorm_jax.rescale(params, log_scales(graph, seed, spread), graph)
  y = apply(params, x)
  assert rel_err(apply(start, x), y) < 1e-4
  energies = [float(enorm_jax.energy(start, graph))]
  current = start
  for _ in range(4):
    current, _ = balance_jit(current, graph=graph)
    energies.append(float(enorm_jax.energy(current, graph)))
    assert rel_err(apply(current, x), y) < 1e-4
  assert all(b <= a * (1 + 1e-5) for a, b in zip(energies, energies[1:])), energies


@given(networks(), st.integers(0, 1000))
def test_unique_minimum_and_idempotent_fixed_point(net, seed):
  apply, params, graph, x = net
  finals = []
  for s in (seed, seed + 1):
    start = enorm_jax.rescale(params, log_scales(graph, s, 6.0), graph)
    out, _ = balance_jit(start, graph=graph, cycles=400, schedule="parallel")
    finals.append(out)
  chex.assert_trees_all_close(finals[0], finals[1], rtol=2e-3, atol=1e-5)
  again, scales = balance_jit(finals[0], graph=graph)
  assert max(float(jnp.max(jnp.abs(jnp.log(s)))) for s in scales) < 1e-3
  chex.assert_trees_all_close(again, finals[0], rtol=2e-3, atol=1e-5)


# Slow: test_transform checks the rescaled momentum against hand-derived updates.
@pytest.mark.slow
@given(networks())
def test_rescaled_momentum_is_gradient_at_balanced_params(net):
  """eq. (10) through the wrapper: after one enorm(sgd(momentum)) step, the
  momentum equals the gradient of a quadratic loss of the network, taken at the
  starting params expressed in the balanced coordinates."""
  apply, params, graph, x = net
  target = jax.random.normal(jax.random.key(7), apply(params, x).shape)
  loss = lambda p: jnp.sum((apply(p, x) - target) ** 2)
  tx = enorm_jax.enorm(optax.sgd(1e-3, momentum=0.9), graph)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  stepped = optax.apply_updates(params, jax.tree.map(lambda g: -1e-3 * g, grads))
  _, scales = enorm_jax.balance(stepped, graph)
  expected = jax.grad(loss)(enorm_jax.rescale(params, scales, graph))
  chex.assert_trees_all_close(state.inner_state[0].trace, expected, rtol=1e-3, atol=1e-6)


# Slow: test_trace compares traced and declared graphs of every paper architecture.
@pytest.mark.slow
@given(networks())
def test_traced_graph_matches_declared_graph_and_checks(net):
  """The tracer finds exactly the declared groups of every random architecture."""
  from tests.test_trace import canonical
  apply, params, graph, x = net
  traced = enorm_jax.trace_graph(apply, params, x[:1])
  assert canonical(traced, params) == canonical(graph, params)
  enorm_jax.check_graph(apply, params, traced, x)
