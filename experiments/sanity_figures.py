r"""Appendix D.1 sanity figures.

    python -m experiments.sanity_figures --out_dir=experiments/results

* Figure 9: the total l2 norm of a randomly initialised ResNet-18 (type C) over 50
  ENorm cycles (it decreases monotonically and converges).
* Figure 10: the total l2 norm of the weights during FC training with and without
  ENorm, read from two training workdirs' ``metrics.jsonl`` (``train_param_l2``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

import enorm_jax
from experiments.common import reports
from enorm_jax.models import ResNet18C

_OUT = flags.DEFINE_string("out_dir", "experiments/results", "Where to write figures.")
_CYCLES = flags.DEFINE_integer("cycles", 50, "ENorm cycles for Figure 9.")
_BASELINE = flags.DEFINE_string(
    "baseline_workdir", "workdirs/cifar10_fc_search/method=baseline_c=1.0_depth=3_"
    "batch_size=256_momentum=0.0_lr=0.01_epochs=10_seed=0", "Figure 10: run without ENorm.")
_ENORM = flags.DEFINE_string(
    "enorm_workdir", "workdirs/cifar10_fc_search/method=enorm_c=1.0_depth=3_"
    "batch_size=256_momentum=0.0_lr=0.01_epochs=10_seed=0", "Figure 10: run with ENorm.")


def figure9(out_dir, cycles):
  model = ResNet18C()
  params = model.init(jax.random.key(0), jnp.ones((1, 224, 224, 3)))["params"]
  graph = model.rescaling_graph(params)
  step = jax.jit(lambda p: enorm_jax.balance(p, graph)[0])
  norm = jax.jit(lambda p: jnp.sqrt(enorm_jax.energy(p, graph)))
  norms = [float(norm(params))]
  for _ in range(cycles):
    params = step(params)
    norms.append(float(norm(params)))
  _plot([(range(len(norms)), norms, "ResNet-18 (type C)")], "ENorm cycle",
        "total l2 norm of the weights", "Figure 9: random ResNet-18 under ENorm",
        os.path.join(out_dir, "fig9_resnet18_norm.png"))
  with open(os.path.join(out_dir, "fig9_resnet18_norm.json"), "w") as f:
    json.dump(norms, f)
  return norms


def figure10(out_dir, runs):
  series = []
  for label, workdir in runs:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
      print(f"Figure 10: {path} not found; skipped.")
      return None
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if "train_param_l2" in r]
    series.append(([r["step"] for r in rows], [r["train_param_l2"] for r in rows], label))
  _plot(series, "training step", "total l2 norm of the weights",
        "Figure 10: FC-3 training on CIFAR-10", os.path.join(out_dir, "fig10_fc_norm.png"))
  with open(os.path.join(out_dir, "fig10_fc_norm.json"), "w") as f:
    json.dump({label: {"step": list(s), "l2": list(v)} for s, v, label in series}, f)
  return series


def _plot(series, xlabel, ylabel, title, path):
  plt = reports.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for xs, ys, label in series:
    ax.plot(list(xs), ys, label=label)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  norms = figure9(_OUT.value, _CYCLES.value)
  print(f"Figure 9: l2 norm {norms[0]:.2f} -> {norms[-1]:.2f} over {_CYCLES.value} cycles")
  figure10(_OUT.value, [("without ENorm", _BASELINE.value), ("with ENorm", _ENORM.value)])


if __name__ == "__main__":
  app.run(main)
