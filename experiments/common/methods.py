"""The paper's methods as model + optimizer setups, and their jitted train/eval steps.

Shared by the CIFAR-10 and ImageNet experiments. ``config.method`` is one of
`METHODS`: ``baseline`` (no normalization), ``bn``, ``gn``, ``enorm``
(``enorm_jax.enorm`` with ``config.c``), ``enorm_impl`` (Appendix C) and
``path_sgd``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

import enorm_jax
from experiments.common import trainer

METHODS = ("baseline", "bn", "gn", "enorm", "enorm_impl", "path_sgd")


def check_method(config: ml_collections.ConfigDict, methods=METHODS) -> None:
  """Fails, with the fix, on a method or hyperparameter that cannot work."""
  if config.method not in methods:
    raise ValueError(f"config.method={config.method!r} is unknown; use one of {methods}.")
  if not config.c > 0:
    raise ValueError(f"config.c={config.c} must be > 0 (1.0 is plain ENorm).")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate={config.learning_rate} must be > 0.")
  for field in ("batch_size", "num_epochs", "num_steps"):
    if field in config and config[field] < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1.")


def norm_of(method: str) -> str:
  return {"bn": "batch", "gn": "group"}.get(method, "none")


def final_bn_of(config) -> bool:
  """The paper's BatchNorm after the classifier, for the nets without normalization
  layers: Baseline and ENorm (the paper), and ENorm-Impl, which trains the same net
  (without it, 5 of 30 seeds of the ImageNet test configuration overflow by step 4
  from logits that start large, `experiments/imagenet/train_test.py`)."""
  return bool(config.final_bn) and config.method in ("baseline", "enorm", "enorm_impl")


def final_bn_axis_of(config) -> str | None:
  """The mesh axis the final BatchNorm shares its statistics over: with per-device
  statistics (``bn_scope='device'``) the paper still shares this layer's across
  GPUs (§6.3); with global statistics the batch is already global."""
  return trainer.DATA_AXIS if config.get("bn_scope", "global") == "device" else None


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the jitted steps close over: the model, the optimizer, the graph and the
  config's static fields they read (never the ConfigDict itself)."""

  model: Any
  tx: optax.GradientTransformation
  graph: enorm_jax.RescalingGraph | None
  state: trainer.TrainState
  method: str
  c: float = 1.0
  impl_lambda: float = 0.0
  bn_scope: str = "global"


def model_params(params, method):
  return params["model"] if method == "enorm_impl" else params


def create_setup(config: ml_collections.ConfigDict, model, example_input: jax.Array,
                 schedule: optax.Schedule) -> Setup:
  """Model variables, optimizer and initial state for ``config.method``.

  The inner optimizer is SGD (``config.momentum``, 0 for none) with weight decay
  ``config.weight_decay``; ``enorm`` wraps it, ``enorm_impl`` adds learnable
  log-scales (not decayed), ``path_sgd`` replaces it (no weight decay).
  """
  variables = model.init(jax.random.key(config.seed), example_input)
  params = variables["params"]
  graph = None
  if config.method in ("enorm", "enorm_impl"):
    graph = model.rescaling_graph(params)
  if config.method == "path_sgd":
    apply = lambda p, x: model.apply({"params": p}, x)
    tx = enorm_jax.contrib.path_sgd(schedule, apply, example_input)
  else:
    decay = optax.add_decayed_weights(config.weight_decay)
    if config.method == "enorm_impl":
      decay = optax.masked(decay, {"model": True, "log_scales": False})
      params = {"model": params, "log_scales": enorm_jax.contrib.init_log_scales(graph)}
    tx = optax.chain(decay, optax.sgd(schedule, momentum=config.momentum or None))
    if config.method == "enorm":
      tx = enorm_jax.enorm(tx, graph, c=config.c, cycles=config.enorm_cycles,
                           every_k=config.enorm_every_k,
                           bias_steps=config.get("enorm_bias_steps", "balanced"))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             batch_stats=variables.get("batch_stats", {}),
                             opt_state=tx.init(params))
  return Setup(model, tx, graph, state, method=config.method, c=config.c,
               impl_lambda=config.impl_lambda, bn_scope=config.get("bn_scope", "global"))


def _apply(setup: Setup, params, batch_stats, images, train: bool):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    if train:
      logits, updates = setup.model.apply(variables, images, train=True,
                                          mutable=["batch_stats"])
      return logits, updates["batch_stats"]
  return setup.model.apply(variables, images, train=train), batch_stats


def _gradients(setup: Setup, state: trainer.TrainState, batch):
  """Gradients, the new batch statistics and per-batch metrics."""
  def loss_fn(params):
    logits, batch_stats = _apply(setup, model_params(params, setup.method),
                                 state.batch_stats, batch["image"], True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    total = loss
    if setup.method == "enorm_impl":
      total = loss + setup.impl_lambda * enorm_jax.contrib.implicit_energy(
          params["model"], params["log_scales"], setup.graph, c=setup.c)
    return total, (loss, logits, batch_stats)

  grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return grads, batch_stats, {"loss": loss, "accuracy": accuracy}


def train_step(setup: Setup, state: trainer.TrainState, batch, mesh=None):
  """One optimizer step (and one ENorm cycle for ``enorm``).

  With ``setup.bn_scope == 'device'`` (and a mesh), the forward and backward
  passes run per device under `jax.shard_map`, so BatchNorm statistics are
  computed per device as in the paper; gradients, statistics and metrics are
  then averaged over devices. Otherwise one global-batch computation is
  partitioned by XLA (BatchNorm statistics over the global batch).
  """
  local_grads = functools.partial(_gradients, setup)
  grads_fn = local_grads
  if setup.bn_scope == "device" and mesh is not None:
    def per_device(state, batch):
      out = local_grads(state, batch)
      return jax.tree.map(lambda x: jax.lax.pmean(x, trainer.DATA_AXIS), out)
    grads_fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(trainer.DATA_AXIS)),
                             out_specs=P(), check_vma=False)
  grads, batch_stats, metrics = grads_fn(state, batch)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  weights = model_params(params, setup.method)
  metrics["param_l2"] = jnp.sqrt(sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(weights)))
  return trainer.TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state), metrics


def eval_step(setup: Setup, state: trainer.TrainState, batch):
  logits, _ = _apply(setup, model_params(state.params, setup.method), state.batch_stats,
                     batch["image"], False)
  return trainer.classification_metrics(logits, batch["label"], batch["mask"])


def make_steps(setup: Setup, mesh):
  """Jitted train and eval steps: batch sharded over ``mesh``, state replicated and donated."""
  repl, data = trainer.replicated(mesh), trainer.data_sharded(mesh)
  train = jax.jit(functools.partial(train_step, setup, mesh=mesh),
                  in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, setup), in_shardings=(repl, data),
                     out_shardings=repl)
  return train, evaluate


def evaluate_splits(eval_fn, state, mesh, batches: dict[str, Callable[[], Iterable]]
                    ) -> dict[str, float]:
  """``<split>_acc``, ``<split>_top5`` and ``<split>_loss`` for each split's batches."""
  out = {}
  for split, make_batches in batches.items():
    totals = None
    for batch in make_batches():
      m = jax.device_get(eval_fn(state, trainer.shard_batch(batch, mesh)))
      totals = m if totals is None else {k: totals[k] + m[k] for k in m}
    out[f"{split}_acc"] = float(totals["top1"] / totals["count"])
    out[f"{split}_top5"] = float(totals["top5"] / totals["count"])
    out[f"{split}_loss"] = float(totals["loss"] / totals["count"])
  return out
