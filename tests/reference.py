"""Independent numpy references for ENorm on plain chains (float64, no enorm_jax code)."""

import numpy as np
import scipy.optimize


def chain_energy(kernels, p=2.0, c=1.0, biases=None):
  """sum_k ||c^(q-k) W_k||_p^p for a chain of q layers (layer k = 1..q)."""
  q = len(kernels)
  e = sum(c ** (p * (q - k)) * np.sum(np.abs(w) ** p) for k, w in enumerate(kernels, 1))
  if biases is not None:
    e += sum(c ** (p * (q - k)) * np.sum(np.abs(b) ** p)
             for k, b in enumerate(biases, 1) if b is not None)
  return e


def balance_chain(kernels, biases=None, p=2.0, c=1.0, cycles=1, include_biases=False,
                  buffers=()):
  """Algorithm 1 / eq. (5): sequential exact updates, hidden layer by hidden layer.

  ``kernels[k]`` is (in, out). ``buffers`` is a list of (kernels, biases, power)
  triples of optimizer buffers rescaled with the same factors (power -1 for
  first moments, -2 for second moments).
  """
  ws = [np.array(w, np.float64) for w in kernels]
  bs = [None if b is None else np.array(b, np.float64) for b in (biases or [None] * len(ws))]
  bufs = [([np.array(w, np.float64) for w in bw],
           [None if b is None else np.array(b, np.float64) for b in bb], power)
          for bw, bb, power in buffers]
  for _ in range(cycles):
    for k in range(len(ws) - 1):
      left = np.sum(np.abs(ws[k]) ** p, axis=0)
      if include_biases and bs[k] is not None:
        left = left + np.abs(bs[k]) ** p
      right = np.sum(np.abs(ws[k + 1]) ** p, axis=1)
      with np.errstate(divide="ignore", invalid="ignore"):
        d = np.sqrt((right ** (1 / p)) / (left ** (1 / p))) / np.sqrt(c)
      d = np.where(np.isfinite(d) & (d > 0), d, 1.0)
      ws[k] = ws[k] * d[None, :]
      ws[k + 1] = ws[k + 1] / d[:, None]
      if bs[k] is not None:
        bs[k] = bs[k] * d
      for bw, bb, power in bufs:
        bw[k] = bw[k] * d[None, :] ** power
        bw[k + 1] = bw[k + 1] / d[:, None] ** power
        if bb[k] is not None:
          bb[k] = bb[k] * d ** power
  return ws, bs, bufs


def newton_minimum(kernels, p=2.0, c=1.0, biases=None):
  """The minimum over log-scales of the chain energy, by scipy's trust-region Newton.

  The energy is sum_k c^(p(q-k)) sum_ij |W_k,ij|^p exp(p (a_k,j - a_(k-1),i)) (plus
  bias terms exp(p a_k,j)), convex in the log-scales a (a_0 = a_q = 0). Gradient
  and Hessian are exact, so the solver converges quadratically in float64.
  """
  q = len(kernels)
  ws = [np.abs(np.array(w, np.float64)) ** p for w in kernels]
  bs = [None if b is None else np.abs(np.array(b, np.float64)) ** p
        for b in (biases or [None] * q)]
  sizes = [w.shape[1] for w in ws[:-1]]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  n = int(offsets[-1])

  def index(layer):  # positions of hidden layer `layer` (1..q-1) in x, or None
    return None if layer in (0, q) else np.arange(offsets[layer - 1], offsets[layer])

  def log_scales(x, layer):
    idx = index(layer)
    return np.zeros(ws[0].shape[0] if layer == 0 else ws[-1].shape[1]) if idx is None else x[idx]

  def terms(x):
    """Yields (k, t, is_bias): t[i, j] is the energy term of W_k[i, j] (or of b_k[j])."""
    for k in range(q):
      weight = c ** (p * (q - 1 - k))
      a_in, a_out = log_scales(x, k), log_scales(x, k + 1)
      yield k, weight * ws[k] * np.exp(p * (a_out[None, :] - a_in[:, None])), False
      if bs[k] is not None:
        yield k, (weight * bs[k] * np.exp(p * a_out))[None, :], True

  def fun(x):
    return sum(t.sum() for _, t, _ in terms(x))

  def grad(x):
    g = np.zeros(n)
    for k, t, is_bias in terms(x):
      if index(k + 1) is not None:
        g[index(k + 1)] += p * t.sum(axis=0)
      if index(k) is not None and not is_bias:
        g[index(k)] -= p * t.sum(axis=1)
    return g

  def hess(x):
    h = np.zeros((n, n))
    for k, t, is_bias in terms(x):
      out_idx, in_idx = index(k + 1), index(k)
      if out_idx is not None:
        h[out_idx, out_idx] += p * p * t.sum(axis=0)
      if in_idx is not None and not is_bias:
        h[in_idx, in_idx] += p * p * t.sum(axis=1)
        if out_idx is not None:
          h[np.ix_(in_idx, out_idx)] -= p * p * t
          h[np.ix_(out_idx, in_idx)] -= p * p * t.T
    return h

  res = scipy.optimize.minimize(fun, np.zeros(n), jac=grad, hess=hess, method="trust-exact",
                                options=dict(gtol=1e-12, maxiter=1000))
  return res.fun
