"""Dense chains (``Dense_0``, ``Dense_1``, ...) as dicts, and their relative error."""

import jax
import jax.numpy as jnp
import numpy as np

import enorm_jax


def mlp_params(widths, seed=0, bias=True, spread=0.0):
  """A dict-of-Dense chain with random weights; layer k is scaled by exp(spread * N(0,1))."""
  rng = np.random.default_rng(seed)
  params = {}
  for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    scale = np.exp(spread * rng.standard_normal()) / np.sqrt(a)
    layer = {"kernel": jnp.asarray(rng.standard_normal((a, b)) * scale, jnp.float32)}
    if bias:
      layer["bias"] = jnp.asarray(rng.standard_normal(b) * 0.1, jnp.float32)
    params[f"Dense_{k}"] = layer
  return params


def mlp_apply(params, x):
  n = len(params)
  for k in range(n):
    layer = params[f"Dense_{k}"]
    x = x @ layer["kernel"] + layer.get("bias", 0.0)
    if k < n - 1:
      x = jax.nn.relu(x)
  return x


def mlp_graph(params):
  return enorm_jax.chain_graph(params, [f"Dense_{k}" for k in range(len(params))])


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
