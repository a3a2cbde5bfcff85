r"""The first steps of a deep FC net under ENorm, with and without biases, measured.

    python -m experiments.cifar10.bias_dynamics --depth=15 --c=1.2 --lr=0.05 --steps=200

Trains the §6.1 FC net (SGD, batch 256, weight decay 1e-3, CIFAR-10) step by step
for each variant and records, per layer, after every step: the kernel and bias
norms, the RMS of the input-driven part (x @ W) and of the bias part of the
pre-activations, the fraction of active units, the gradient norms, SGD's relative
step ``lr * |g| / |w|`` on kernel and bias, and the spread of ENorm's factors
``d``. A variant stops at its first non-finite loss. Variants:

* ``bias``: biases, rescaled with their unit, not counted in the norms (default).
* ``bias_in_norm``: the same with ``include_biases=True`` (§3.5).
* ``bias_no_decay``: ``bias`` without weight decay on the biases.
* ``bias_c1``: ``bias`` with c = 1 instead of ``--c``.
* ``bias_unbalanced_steps``: ``bias`` with the biases stepped in unbalanced
  coordinates.
* ``no_bias``: a net without biases (the official code's nets).

Writes ``<results_dir>/bias_dynamics_depth<D>_c<C>.json`` and ``.png`` (``--plot_only``
redraws the figure from the JSON) and prints a summary. ``bias_unbalanced_steps``
multiplies the bias gradients by ``S**2`` (``S``: the unit's accumulated ENorm
factor), which for SGD without momentum is what
``enorm_jax.enorm(..., bias_steps='unbalanced')`` does.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import enorm_jax
from enorm_jax import models
from experiments.cifar10 import input_pipeline
from experiments.cifar10.configs import fc
from experiments.common import reports

VARIANTS = ("bias", "bias_in_norm", "bias_no_decay", "bias_c1", "bias_unbalanced_steps", "no_bias")
_DEPTH = flags.DEFINE_integer("depth", 15, "Number of 500x500 intermediary layers.")
_C = flags.DEFINE_float("c", 1.2, "ENorm's asymmetric scaling.")
_LR = flags.DEFINE_float("lr", 0.05, "Constant SGD learning rate.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per variant.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {VARIANTS}.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "ImageFolder dir ('': tfds.load).")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "experiments/results", "Output folder.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only redraw the figure from the JSON.")


def variant_setup(variant: str, depth: int, c: float, lr: float, seed: int = 0):
  """(model, params, graph, SGD, balance keyword arguments) of one variant.

  SGD without momentum has no state, so SGD followed by `enorm_jax.balance` is
  exactly what `enorm_jax.enorm` does, with the factors ``d`` visible.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is unknown; use one of {VARIANTS}.")
  model = models.FullyConnected(depth=depth, use_bias=variant != "no_bias")
  params = model.init(jax.random.key(seed), jnp.ones((1, 3072)))["params"]
  decay = optax.add_decayed_weights(1e-3)
  if variant == "bias_no_decay":
    decay = optax.masked(decay, jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key != "bias", params))
  balance_args = dict(c=1.0 if variant == "bias_c1" else c,
                      include_biases=variant == "bias_in_norm")
  return model, params, model.rescaling_graph(params), optax.chain(decay, optax.sgd(lr)), \
      balance_args


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def layer_stats(model, params, grads, images, lr):
  """Per-layer statistics of one batch (arrays of shape (layers,))."""
  layers = [f"Dense_{i}" for i in range(model.depth + 2)]
  x = images.reshape((images.shape[0], -1))
  out = {k: [] for k in ("w_norm", "b_norm", "input_rms", "bias_rms", "active",
                         "w_grad", "b_grad", "w_rel_step", "b_rel_step")}
  for i, name in enumerate(layers):
    kernel = params[name]["kernel"]
    bias = params[name].get("bias", jnp.zeros(kernel.shape[-1]))
    bias_grad = grads[name].get("bias", jnp.zeros_like(bias))
    driven = x @ kernel
    pre = driven + bias
    out["w_norm"].append(jnp.linalg.norm(kernel))
    out["b_norm"].append(jnp.linalg.norm(bias))
    out["input_rms"].append(_rms(driven))
    out["bias_rms"].append(_rms(bias))
    out["active"].append(jnp.mean(pre > 0))
    out["w_grad"].append(jnp.linalg.norm(grads[name]["kernel"]))
    out["b_grad"].append(jnp.linalg.norm(bias_grad))
    out["w_rel_step"].append(lr * out["w_grad"][-1] / out["w_norm"][-1])
    out["b_rel_step"].append(lr * out["b_grad"][-1] / jnp.maximum(out["b_norm"][-1], 1e-30))
    x = jax.nn.relu(pre) if i < len(layers) - 1 else pre
  return {k: jnp.stack(v) for k, v in out.items()}


def make_step(model, graph, tx, lr, balance_args, unbalanced_bias_steps=False):
  """A jitted step returning the new state, the loss, layer stats and log-factor spreads."""
  @jax.jit
  def step(params, opt_state, log_unit_scale, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    stats = layer_stats(model, params, grads, images, lr)
    if unbalanced_bias_steps:  # bias gradients times S**2: SGD on the biases in unbalanced coordinates
      grads = dict(grads)
      for i, log_s in enumerate(log_unit_scale):
        layer = dict(grads[f"Dense_{i}"])
        layer["bias"] = layer["bias"] * jnp.exp(2 * log_s)
        grads[f"Dense_{i}"] = layer
    updates, opt_state = tx.update(grads, opt_state, params)
    stepped = optax.apply_updates(params, updates)
    new_params, scales = enorm_jax.balance(stepped, graph, **balance_args)
    log_d = [jnp.log(s) for s in scales]  # one group per hidden layer, in order
    log_unit_scale = [a + b for a, b in zip(log_unit_scale, log_d)]
    stats["log_d_min"] = jnp.stack([jnp.min(v) for v in log_d])
    stats["log_d_max"] = jnp.stack([jnp.max(v) for v in log_d])
    return new_params, opt_state, log_unit_scale, loss, stats
  return step


def run_variant(variant, depth, c, lr, steps, ds, config):
  model, params, graph, tx, balance_args = variant_setup(variant, depth, c, lr)
  step = make_step(model, graph, tx, lr, balance_args, variant == "bias_unbalanced_steps")
  opt_state = tx.init(params)
  log_unit_scale = [jnp.zeros(g.size) for g in graph]
  record = dict(variant=variant, depth=depth, c=balance_args["c"], lr=lr, losses=[], stats=[],
                first_nonfinite_step=None)
  for i, batch in enumerate(input_pipeline.train_batches(ds, config)):
    if i >= steps:
      break
    params, opt_state, log_unit_scale, loss, stats = step(
        params, opt_state, log_unit_scale, batch["image"], batch["label"])
    loss = float(loss)
    record["losses"].append(loss if math.isfinite(loss) else None)
    record["stats"].append({k: [float(f"{x:.4g}") for x in np.asarray(v).tolist()]
                            for k, v in stats.items()})
    if not math.isfinite(loss):
      record["first_nonfinite_step"] = i + 1
      break
  return record


def summary(record) -> str:
  """One line per variant: the end state and the layer with the largest bias step."""
  last = record["stats"][-1]
  k = int(np.argmax(last["b_rel_step"])) if record["variant"] != "no_bias" else -1
  finite = [x for x in record["losses"] if x is not None]
  end = (f"non-finite at step {record['first_nonfinite_step']}"
         if record["first_nonfinite_step"] else f"loss {finite[-1]:.3f} after "
         f"{len(record['losses'])} steps")
  line = f"{record['variant']:>14} (c={record['c']:g}): {end}"
  if k >= 0:
    line += (f"; largest bias step Dense_{k}: {last['b_rel_step'][k]:.2e}, bias/input RMS "
             f"{last['bias_rms'][k] / max(last['input_rms'][k], 1e-30):.2e}, active "
             f"{last['active'][k]:.2f}")
  return line


def plot(records, path, layer: int = 8) -> None:
  """Loss, and one middle layer's bias-to-signal ratio and active fraction, per step."""
  plt = reports.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for r in records:
    steps = range(1, len(r["stats"]) + 1)
    label = f"{r['variant']} (c={r['c']:g})"
    axes[0].plot(steps, [x if x is not None else float("nan") for x in r["losses"]],
                 label=label)
    ratio = [s["bias_rms"][layer] / max(s["input_rms"][layer], 1e-30) for s in r["stats"]]
    axes[1].plot(steps, ratio, label=label)
    axes[2].plot(steps, [s["active"][layer] for s in r["stats"]], label=label)
  axes[0].set(yscale="log", xlabel="step", ylabel="training loss", ylim=(1.5, 1e3))
  axes[1].set(yscale="log", xlabel="step",
              ylabel=f"Dense_{layer}: RMS(bias) / RMS(x @ W)")
  axes[2].set(xlabel="step", ylabel=f"Dense_{layer}: fraction of active units")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"FC-{records[0]['depth']}, SGD lr {records[0]['lr']:g}, CIFAR-10")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  path = os.path.join(_RESULTS_DIR.value,
                      f"bias_dynamics_depth{_DEPTH.value}_c{_C.value:g}.json")
  if _PLOT_ONLY.value:
    with open(path) as f:
      plot(json.load(f), path.replace(".json", ".png"))
    return
  config = fc.get_config()
  config.data_dir = _DATA_DIR.value
  ds = input_pipeline.load(config)
  records = [run_variant(v, _DEPTH.value, _C.value, _LR.value, _STEPS.value, ds, config)
             for v in _VARIANTS.value]
  for r in records:
    print(summary(r))
  with open(path, "w") as f:
    json.dump(records, f, separators=(",", ":"))
  plot(records, path.replace(".json", ".png"))
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
