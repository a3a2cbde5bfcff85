"""Llama-style decoders as people write them: RMSNorm, rotary embeddings (halves
with `jnp.split` or slices, interleaved pairs, complex numbers), grouped-query
attention through `nn.dot_product_attention`, a SwiGLU MLP, no biases, layers
unrolled or stacked with `nn.scan`. Every exact unit is found: per layer the two
norm gains, one query/key unit per (K/V head, rotated pair), one value/output
unit per (K/V head, head dim) and one up/down unit per MLP feature."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

D, HEADS, KV_HEADS, HD, MLP, LAYERS, T, VOCAB = 32, 4, 2, 8, 64, 2, 6, 50
UNITS = LAYERS * (2 * D + KV_HEADS * HD // 2 + KV_HEADS * HD + MLP) + D  # 336


def rotate(x, style):
  """Rotary embedding of (batch, time, heads, HD) in one of four idioms."""
  half = HD // 2
  angle = jnp.arange(x.shape[1])[:, None] / 10000 ** (jnp.arange(half) / half)
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  if style == "split":
    a, b = jnp.split(x, 2, axis=-1)
  elif style == "slice":
    a, b = x[..., :half], x[..., half:]
  elif style == "interleaved":
    a, b = x[..., 0::2], x[..., 1::2]
  else:
    z = jax.lax.complex(x[..., 0::2], x[..., 1::2]) * jnp.exp(1j * angle)[None, :, None]
    return jnp.stack([z.real, z.imag], -1).reshape(x.shape)
  a, b = a * cos - b * sin, b * cos + a * sin
  if style == "interleaved":
    return jnp.stack([a, b], -1).reshape(x.shape)
  return jnp.concatenate([a, b], -1)


class Block(nn.Module):
  style: str
  grouped: bool = False  # MaxText: queries reshaped to (K/V heads, group), one einsum

  @nn.compact
  def __call__(self, x, _):
    y = nn.RMSNorm(name="attn_norm")(x)
    q = rotate(nn.DenseGeneral((HEADS, HD), use_bias=False, name="wq")(y), self.style)
    k = rotate(nn.DenseGeneral((KV_HEADS, HD), use_bias=False, name="wk")(y), self.style)
    v = nn.DenseGeneral((KV_HEADS, HD), use_bias=False, name="wv")(y)
    group, t = HEADS // KV_HEADS, x.shape[1]
    if self.grouped:
      qg = q.reshape(q.shape[:2] + (KV_HEADS, group, HD)) / np.sqrt(HD)
      mask = jnp.where(jnp.tril(jnp.ones((t, t))) > 0, 0.0, -1e9)
      a = jax.nn.softmax(jnp.einsum("btkgd,bskd->bkgts", qg, k) + mask, -1)
      o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(q.shape)
    else:
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      o = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="wo")(o)
    y = nn.RMSNorm(name="mlp_norm")(x)
    h = nn.silu(nn.Dense(MLP, use_bias=False, name="gate")(y)) * nn.Dense(
        MLP, use_bias=False, name="up")(y)
    return x + nn.Dense(D, use_bias=False, name="down")(h), None


class Llama(nn.Module):
  style: str
  scanned: bool
  grouped: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    if self.scanned:
      block = nn.remat(Block) if self.remat else Block
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)(self.style, self.grouped, name="layers")(x, None)
    else:
      for i in range(LAYERS):
        x, _ = Block(self.style, self.grouped, name=f"layers_{i}")(x, None)
    return nn.Dense(VOCAB, use_bias=False, name="head")(nn.RMSNorm(name="final")(x))


def _pair_factors(d, style):
  """Per-pair factors (..., HD / 2) spread over the head dim of ``style``."""
  return jnp.repeat(d, 2, axis=-1) if style in ("interleaved", "complex") else jnp.concatenate(
      [d, d], -1)


@pytest.mark.parametrize("style,scanned,grouped,remat", [
    # The default set: split halves (MaxText's grouped einsum, nn.remat inside
    # nn.scan) and complex pairs (interleaved, through stack and complex).
    pytest.param("split", False, False, False, marks=pytest.mark.slow),
    pytest.param("split", True, False, False, marks=pytest.mark.slow),
    ("split", True, True, True),
    pytest.param("slice", True, False, False, marks=pytest.mark.slow),
    pytest.param("interleaved", True, False, False, marks=pytest.mark.slow),
    ("complex", True, False, False)])
def test_every_exact_unit_of_a_llama_decoder(style, scanned, grouped, remat):
  model = Llama(style, scanned, grouped, remat)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
  params = model.init(jax.random.key(0), tokens)["params"]
  fn = lambda p, t: model.apply({"params": p}, t)
  graph = enorm_jax.trace_graph(fn, params, tokens)
  assert graph.num_units == UNITS
  sizes = collections.Counter()
  for g in graph:  # summed over the layers, unrolled or stacked
    sizes[g.producers[0].path.split("/", 1)[-1]] += g.size
  assert sizes["wq/kernel"] == LAYERS * KV_HEADS * HD // 2
  assert sizes["wv/kernel"] == LAYERS * KV_HEADS * HD
  assert sizes["up/kernel"] == LAYERS * MLP
  # By hand, in the first layer: query columns of a group's heads times d[k, pair],
  # the key columns of K/V head k divided.
  layer = (lambda tree: tree["layers"]) if scanned else (lambda tree: tree["layers_0"])
  first = (0,) if scanned else ()
  rng = np.random.default_rng(0)
  d = np.exp(rng.normal(size=(KV_HEADS, HD // 2))).astype(np.float32)
  per_dim = _pair_factors(d, style)  # (KV_HEADS, HD)
  heads = np.arange(HEADS) // (HEADS // KV_HEADS)
  moved = jax.tree.map(lambda a: a, params)
  wq, wk = layer(params)["wq"]["kernel"], layer(params)["wk"]["kernel"]
  layer(moved)["wq"]["kernel"] = wq.at[first].multiply(per_dim[heads][None])
  layer(moved)["wk"]["kernel"] = wk.at[first].divide(per_dim[None])
  np.testing.assert_allclose(fn(moved, tokens), fn(params, tokens), rtol=2e-4, atol=2e-4)
  assert not np.allclose(layer(moved)["wq"]["kernel"], wq)
  # Every group at once, random log-normal factors: the function stays.
  factors = [np.exp(rng.normal(size=g.size)).astype(np.float32) for g in graph]
  np.testing.assert_allclose(fn(enorm_jax.rescale(params, factors, graph), tokens),
                             fn(params, tokens), rtol=1e-4, atol=1e-4)
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  np.testing.assert_allclose(fn(balanced, tokens), fn(params, tokens), rtol=2e-4, atol=2e-4)
  enorm_jax.check_graph(fn, params, graph, tokens)


def test_a_donated_cycle_writes_every_kernel_in_place():
  """Stacked kernels whose units are (layer, K/V head, rotated pair) are scaled
  through a reshaped view; the donated cycle still writes every leaf in place
  (no copy into its buffer), and the query kernel is exactly as by hand."""
  model = Llama("split", scanned=True, grouped=True)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
  params = model.init(jax.random.key(0), tokens)["params"]
  graph = enorm_jax.trace_graph(lambda p, t: model.apply({"params": p}, t), params, tokens)
  cycle = jax.jit(lambda p: enorm_jax.balance(p, graph), donate_argnums=0)
  hlo = cycle.lower(params).compile().as_text()
  kernel_copies = [line for line in hlo.splitlines()
                   if re.search(r"f32\[\d+(,\d+)+\]\{[0-9,]*\} copy\(", line)]
  assert not kernel_copies, kernel_copies
  balanced, scales = cycle(jax.tree.map(jnp.copy, params))
  index = {g.producers[0].path: i for i, g in enumerate(graph)}
  d = np.asarray(scales[index["layers/wq/kernel"]]).reshape(LAYERS, KV_HEADS, HD // 2)
  norm = np.asarray(scales[index["layers/attn_norm/scale"]]).reshape(LAYERS, D)
  heads = np.arange(HEADS) // (HEADS // KV_HEADS)
  per_dim = np.stack([_pair_factors(d[i], "split")[heads] for i in range(LAYERS)])
  expected = (np.asarray(params["layers"]["wq"]["kernel"]) / norm[:, :, None, None]
              * per_dim[:, None])
  np.testing.assert_allclose(balanced["layers"]["wq"]["kernel"], expected, rtol=1e-6)
