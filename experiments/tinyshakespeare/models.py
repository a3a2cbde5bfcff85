"""Character-level decoders: a GPT-style pre-LayerNorm transformer with ReLU MLPs
(`DecoderLM`) and a Llama-style one (`LlamaLM`: RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU, no biases, layers stacked with `nn.scan`)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp


class DecoderLM(nn.Module):
  vocab_size: int
  num_layers: int = 4
  width: int = 128
  num_heads: int = 4
  mlp_width: int = 512
  context: int = 128

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[1])
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    x = x + nn.Embed(self.context, self.width, name="position")(positions)
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      h = nn.LayerNorm(name=f"block{i}_attn_norm")(x)
      x = x + nn.MultiHeadDotProductAttention(self.num_heads, name=f"block{i}_attn")(
          h, mask=mask)
      h = nn.LayerNorm(name=f"block{i}_mlp_norm")(x)
      h = nn.relu(nn.Dense(self.mlp_width, name=f"block{i}_fc1")(h))
      x = x + nn.Dense(self.width, name=f"block{i}_fc2")(h)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(self.vocab_size, name="head")(x)


def rotary(x, base: float = 10000.0):
  """Rotary position embedding of (batch, time, heads, head_dim), halves rotated
  together (written with `jnp.split`, as MaxText and the Flax Gemma example do)."""
  half = x.shape[-1] // 2
  angle = jnp.arange(x.shape[1])[:, None] / base ** (jnp.arange(half) / half)
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class LlamaBlock(nn.Module):
  """RMSNorm, grouped-query attention with rotary embeddings, a SwiGLU MLP; no biases."""
  width: int
  num_heads: int
  num_kv_heads: int
  mlp_width: int

  @nn.compact
  def __call__(self, x, _):
    head_dim = self.width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, use_bias=False)
    y = nn.RMSNorm(name="attn_norm")(x)
    q = rotary(dense((self.num_heads, head_dim), name="query")(y))
    k = rotary(dense((self.num_kv_heads, head_dim), name="key")(y))
    v = dense((self.num_kv_heads, head_dim), name="value")(y)
    group = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    o = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    x = x + dense(self.width, axis=(-2, -1), name="out")(o)
    y = nn.RMSNorm(name="mlp_norm")(x)
    h = nn.silu(dense(self.mlp_width, name="gate")(y)) * dense(self.mlp_width, name="up")(y)
    return x + dense(self.width, name="down")(h), None


class LlamaLM(nn.Module):
  """A Llama-style decoder: token embedding, `nn.scan` over `LlamaBlock` layers
  (params stacked on a leading layer axis), a final RMSNorm and an untied head."""
  vocab_size: int
  num_layers: int = 4
  width: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_width: int = 384

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    x, _ = nn.scan(LlamaBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.num_layers)(self.width, self.num_heads, self.num_kv_heads,
                                           self.mlp_width, name="layers")(x, None)
    x = nn.RMSNorm(name="final_norm")(x)
    return nn.Dense(self.vocab_size, use_bias=False, name="head")(x)


# The kernel whose columns are the MLP's hidden units, per architecture.
MLP_HIDDEN_KERNELS = {"gpt": "_fc1/kernel", "llama": "layers/up/kernel"}
