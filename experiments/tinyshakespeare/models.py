"""A pre-LayerNorm, decoder-only character transformer with ReLU MLPs."""

from __future__ import annotations

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
