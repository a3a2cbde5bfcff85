r"""What ENorm does to the weights during training: AdamW and enorm(AdamW) side by side.

    python -m experiments.tinyshakespeare.dynamics --data_dir=../shared/data/tinyshakespeare \
        [--architecture=gpt] [--steps=1000] [--every=50]

Both methods at the default config (the sweep's best rate for both, 0.003), the
same seed, data order and init. Every ``--every`` steps, per kind of weight
(query, key, value, out, the MLP's kernels, the norm gains; summed over layers):
its energy ``sum w^2``, and its relative step ``||W_t+1 - W_t|| / ||W_t||`` (for
ENorm the step includes the rescaling). For ENorm also the factors of the last
cycle per group family (|log d|: median and 90th percentile over units). Writes
``tinyshakespeare_dynamics_<architecture>.json`` and ``.png`` to ``--results_dir``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import enorm_jax
from experiments.common import reports, sweeps, trainer
from experiments.tinyshakespeare import input_pipeline, train
from experiments.tinyshakespeare.configs import default

# --data_dir and --results_dir: the sweeps' flags (one definition per process).
DATA_DIR, RESULTS_DIR = sweeps.DATA_DIR, sweeps.RESULTS_DIR
ARCHITECTURE = flags.DEFINE_enum("architecture", "gpt", ["gpt", "llama"], "Model.")
STEPS = flags.DEFINE_integer("steps", 1000, "Training steps (the schedule's length).")
EVERY = flags.DEFINE_integer("every", 50, "Measure every this many steps.")
METHODS = ("adamw", "enorm")


def group_family(label: str) -> str:
  for key, family in (("norm", "norm gains"), ("query", "query/key"),
                      ("value", "value/out")):
    if key in label:
      return family
  return "mlp"


def measure(old, new, kinds) -> tuple[dict, dict]:
  """Energy per kind of ``new`` and relative step per kind from ``old``."""
  old, new = enorm_jax.leaves_by_path(old), enorm_jax.leaves_by_path(new)
  energy, step, norm = {}, {}, {}
  for path, kind in kinds.items():
    w, w0 = np.asarray(new[path], np.float64), np.asarray(old[path], np.float64)
    energy[kind] = energy.get(kind, 0.0) + float(np.sum(w * w))
    step[kind] = step.get(kind, 0.0) + float(np.sum((w - w0) ** 2))
    norm[kind] = norm.get(kind, 0.0) + float(np.sum(w0 * w0))
  return energy, {k: float(np.sqrt(step[k] / norm[k])) for k in step}


def run(method: str, corpus, config, every: int) -> dict:
  config.method = method
  mesh = trainer.make_mesh(1)
  model = train.create_model(config, len(corpus.vocab))
  params = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, config.context), jnp.int32))["params"]
  full_graph = train.rescaling_graph(model, params, config)  # every group, for labels
  tx = train.create_optimizer(config, full_graph if method != "adamw" else None)
  kinds = {p: k for p in enorm_jax.leaves_by_path(params) if (k := train.weight_kind(p))}
  state = trainer.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                             opt_state=tx.init(params))
  state = jax.device_put(state, trainer.replicated(mesh))
  train_step, eval_step = train.make_steps(model, tx, mesh)
  batches = input_pipeline.train_batches(corpus, config.batch_size, config.context,
                                         config.seed, 0)
  out = {"step": [], "train_loss": [], "energy": [], "relative_step": [], "log_factor": []}
  with trainer.progress(config.num_steps, 0, f"dynamics/{method}") as bar:
    for step in range(1, config.num_steps + 1):
      measured = step % every == 0 or step == 1
      old = jax.device_get(state.params) if measured else None
      state, metrics = train_step(state, trainer.shard_batch(next(batches), mesh))
      bar.update(1)
      if not measured:
        continue
      energy, rel = measure(old, jax.device_get(state.params), kinds)
      factors = {}
      if method != "adamw":
        enorm_state = next(s for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, enorm_jax.EnormState))
            if isinstance(s, enorm_jax.EnormState))
        for group, scale in zip(full_graph, enorm_state.scales):
          factors.setdefault(group_family(group.label), []).append(
              np.abs(np.log(np.asarray(scale, np.float64))))
        factors = {f: [float(np.median(np.concatenate(v))),
                       float(np.quantile(np.concatenate(v), 0.9))] for f, v in factors.items()}
      out["step"].append(step)
      out["train_loss"].append(float(metrics["loss"]))
      out["energy"].append(energy)
      out["relative_step"].append(rel)
      out["log_factor"].append(factors)
  out["validation_loss"] = train.evaluate(eval_step, state, corpus, config, mesh)[
      "validation_loss"]
  return out


def plot(results, path: str) -> None:
  plt = reports.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  colors = {}
  for method, style in zip(METHODS, ("--", "-")):
    r = results[method]
    for kind in r["energy"][0]:
      color = colors.setdefault(kind, f"C{len(colors)}")
      label = f"{kind} ({method})"
      axes[0].plot(r["step"], [e[kind] for e in r["energy"]], style, color=color, label=label)
      if kind in ("query", "key", "value", "out"):
        axes[1].plot(r["step"][1:], [s[kind] for s in r["relative_step"][1:]], style,
                     color=color, label=label)
  r = results["enorm"]
  for i, family in enumerate(r["log_factor"][-1]):
    axes[2].plot(r["step"], [f[family][1] for f in r["log_factor"]], color=f"C{i}",
                 label=f"{family}, 90th pct")
  for ax, title in zip(axes, ("energy sum w^2 (dashed: AdamW)",
                              "attention: relative step per update",
                              "ENorm factors |log d| of the last cycle")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  config = default.get_config()
  config.architecture, config.num_steps = ARCHITECTURE.value, STEPS.value
  config.warmup_steps = round(config.warmup_steps * STEPS.value / default.get_config().num_steps)
  corpus = input_pipeline.make_corpus(input_pipeline.read_text(DATA_DIR.value),
                                      config.validation_fraction)
  results = {m: run(m, corpus, config, EVERY.value) for m in METHODS}
  results["config"] = config.to_dict()
  stem = os.path.join(RESULTS_DIR.value, f"tinyshakespeare_dynamics_{ARCHITECTURE.value}")
  with open(stem + ".json", "w") as f:
    json.dump(results, f, indent=1)
  plot(results, stem + ".png")


if __name__ == "__main__":
  app.run(main)
