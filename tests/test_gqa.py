"""Grouped-query and multi-query attention, in the idioms people write: K/V heads
repeated to the query heads (the Hugging Face Flax port) and queries grouped by
K/V head in one einsum (MaxText). Units: one per (K/V head, head dim) for the
query/key symmetry and for the value/output symmetry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

D, HD, T = 32, 8, 6


class Attention(nn.Module):
  heads: int
  kv_heads: int
  style: str

  @nn.compact
  def __call__(self, tokens):
    h, k_heads, group = self.heads, self.kv_heads, self.heads // self.kv_heads
    x = nn.Embed(50, D)(tokens)
    y = nn.RMSNorm(name="norm")(x)
    q = nn.DenseGeneral((h, HD), use_bias=False, name="wq")(y)
    k = nn.DenseGeneral((k_heads, HD), use_bias=False, name="wk")(y)
    v = nn.DenseGeneral((k_heads, HD), use_bias=False, name="wv")(y)
    mask = jnp.where(jnp.tril(jnp.ones((T, T))) > 0, 0.0, -1e9)
    if self.style == "repeat":
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD) + mask, -1)
      o = jnp.einsum("bhqk,bkhd->bqhd", a, v)
    else:
      qg = q.reshape(q.shape[:2] + (k_heads, group, HD))
      a = jax.nn.softmax(jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(HD) + mask, -1)
      o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(q.shape)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="wo")(o)
    return nn.Dense(50, use_bias=False, name="head")(nn.RMSNorm(name="final")(x))


@pytest.mark.parametrize("style", ["repeat", "grouped"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_both_attention_symmetries_per_kv_head(style, heads, kv_heads):
  model = Attention(heads, kv_heads, style)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 50)
  params = model.init(jax.random.key(0), tokens)["params"]
  fn = lambda p, t: model.apply({"params": p}, t)
  graph = enorm_jax.trace_graph(fn, params, tokens)
  by_anchor = {g.producers[0].path: g for g in graph}
  assert by_anchor["wq/kernel"].size == kv_heads * HD
  assert [e.path for e in by_anchor["wq/kernel"].consumers] == ["wk/kernel"]
  assert by_anchor["wv/kernel"].size == kv_heads * HD
  assert [e.path for e in by_anchor["wv/kernel"].consumers] == ["wo/kernel"]
  assert graph.num_units == 2 * D + 2 * kv_heads * HD  # plus the two norm gains
  # By hand: query columns of every head of a group times d, its key columns
  # divided; value columns times e, the output rows of the group's heads divided.
  rng = np.random.default_rng(0)
  d, e = (np.exp(rng.normal(size=(kv_heads, HD))).astype(np.float32) for _ in range(2))
  group = np.arange(heads) // (heads // kv_heads)
  moved = jax.tree.map(lambda a: a, params)
  moved["wq"]["kernel"] = params["wq"]["kernel"] * d[group][None]
  moved["wk"]["kernel"] = params["wk"]["kernel"] / d[None]
  moved["wv"]["kernel"] = params["wv"]["kernel"] * e[None]
  moved["wo"]["kernel"] = params["wo"]["kernel"] / e[group][:, :, None]
  np.testing.assert_allclose(fn(moved, tokens), fn(params, tokens), rtol=2e-4, atol=2e-4)
  balanced, _ = enorm_jax.balance(params, graph, cycles=5)
  np.testing.assert_allclose(fn(balanced, tokens), fn(params, tokens), rtol=2e-4, atol=2e-4)


class JaxAttention(nn.Module):
  """`jax.nn.dot_product_attention` with its own GQA (fewer K/V heads), a causal
  and a padding mask, and the queries scaled after the projection."""

  @nn.compact
  def __call__(self, tokens, keep):
    x = nn.Embed(50, D)(tokens)
    y = nn.RMSNorm(name="norm")(x)
    q = nn.DenseGeneral((4, HD), use_bias=False, name="wq")(y) * HD ** -0.5
    k = nn.DenseGeneral((2, HD), use_bias=False, name="wk")(y)
    v = nn.DenseGeneral((2, HD), use_bias=False, name="wv")(y)
    o = jax.nn.dot_product_attention(q, k, v, mask=keep[:, None, None, :], is_causal=True,
                                     scale=1.0)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="wo")(o)
    return nn.Dense(50, use_bias=False, name="head")(nn.RMSNorm(name="final")(x))


def test_jax_nn_dot_product_attention_with_masks():
  model = JaxAttention()
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 50)
  keep = jnp.array([[True] * T, [True] * (T - 2) + [False] * 2])
  params = model.init(jax.random.key(0), tokens, keep)["params"]
  fn = lambda p, t, keep: model.apply({"params": p}, t, keep)
  graph = enorm_jax.trace_graph(fn, params, tokens, keep)
  assert graph.num_units == 2 * D + 2 * 2 * HD
  by_anchor = {g.producers[0].path: g for g in graph}
  assert [e.path for e in by_anchor["wq/kernel"].consumers] == ["wk/kernel"]
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  np.testing.assert_allclose(fn(balanced, tokens, keep), fn(params, tokens, keep), rtol=2e-4,
                             atol=2e-4)
