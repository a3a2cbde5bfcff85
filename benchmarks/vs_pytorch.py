r"""One ENorm cycle: the official algorithm in eager PyTorch vs. enorm_jax, same run.

    pip install -e ".[bench]"   # adds torch (CPU)
    python -m benchmarks.vs_pytorch [--quick] [--json PATH]

The PyTorch side re-implements the paper's Algorithm 1 as the official code
runs it: eager, in place, one hidden layer after the other. Both sides balance
the same weights (FC-15 and CIFAR-NV) on the same CPU threads; the steps are
timed in alternation and the final weights are checked to agree.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import enorm_jax
from benchmarks import _common
from enorm_jax.models import CifarNV, FullyConnected


def torch_cycle(torch, kernels, biases, c=1.0):
  """Algorithm 1 in place on torch tensors (Linear: out x in; Conv: out x in x kh x kw)."""
  with torch.no_grad():
    for k in range(len(kernels) - 1):
      w, nxt = kernels[k], kernels[k + 1]
      incoming = w.pow(2).sum(dim=tuple(range(1, w.dim()))).sqrt()
      outgoing = nxt.pow(2).sum(dim=(0,) + tuple(range(2, nxt.dim()))).sqrt()
      d = (outgoing / incoming).sqrt() / c ** 0.5
      w.mul_(d.view(-1, *[1] * (w.dim() - 1)))
      biases[k].mul_(d)
      nxt.div_(d.view(1, -1, *[1] * (nxt.dim() - 2)))


def to_torch(torch, params, names):
  """Flax kernels (in..., out last) as PyTorch layouts, plus biases."""
  kernels, biases = [], []
  for name in names:
    w = np.asarray(params[name]["kernel"])
    w = w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)
    kernels.append(torch.from_numpy(np.ascontiguousarray(w)))
    biases.append(torch.from_numpy(np.array(params[name]["bias"])))
  return kernels, biases


def main():
  args = _common.parser(__doc__).parse_args()
  try:
    import torch
  except ImportError:
    print("torch is not installed: pip install -e '.[bench]'", file=sys.stderr)
    return
  torch.set_num_threads(os.cpu_count())
  reps = 5 if args.quick else 30
  records = []
  for name, model, shape in (("FC-15", FullyConnected(depth=15), (1, 3072)),
                             ("CIFAR-NV", CifarNV(), (1, 28, 28, 3))):
    params = _common.init_params(model, shape)
    graph = model.rescaling_graph(params)
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[1]))
    kernels, biases = to_torch(torch, params, names)
    expected = jax.jit(lambda p, g=graph: enorm_jax.balance(p, g)[0])(params)
    torch_cycle(torch, kernels, biases)
    agree = max(float(np.max(np.abs(k.numpy() - to_torch(torch, expected, [n])[0][0].numpy())))
                for k, n in zip(kernels, names))
    jax_cycle = jax.jit(lambda p, g=graph: enorm_jax.balance(p, g)[0], donate_argnums=0)

    def torch_step(state):
      torch_cycle(torch, *state)
      return state

    ms = _common.interleaved_ms({"jax": (jax_cycle, jax.tree.map(jnp.copy, params)),
                                 "torch": (torch_step, (kernels, biases))}, reps)
    records.append(dict(model=name, torch_ms=ms["torch"], enorm_jax_ms=ms["jax"],
                        speedup=ms["torch"] / ms["jax"], max_abs_diff=agree))
  _common.emit(records, ["model", "torch_ms", "enorm_jax_ms", "speedup", "max_abs_diff"],
               args.json)


if __name__ == "__main__":
  main()
