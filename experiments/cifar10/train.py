"""CIFAR-10 training and evaluation for every method of the paper.

Methods (``config.method``): ``baseline`` (no normalization), ``bn``, ``gn``,
``enorm`` (``enorm_jax.enorm`` with ``config.c``), ``enorm_impl`` (Appendix C)
and ``path_sgd``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import enorm_jax
from experiments import models
from experiments.cifar10 import input_pipeline
from experiments.common import trainer

METHODS = ("baseline", "bn", "gn", "enorm", "enorm_impl", "path_sgd")
MODELS = ("fc", "cifar_nv")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up, with the fix, on settings that cannot work."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is unknown; use one of {METHODS}.")
  if config.model not in MODELS:
    raise ValueError(f"config.model={config.model!r} is unknown; use one of {MODELS}.")
  if not config.c > 0:
    raise ValueError(f"config.c={config.c} must be > 0 (1.0 is plain ENorm).")
  for field in ("batch_size", "num_epochs"):
    if config[field] < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1.")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate={config.learning_rate} must be > 0.")
  if config.method == "path_sgd" and config.model != "fc":
    raise ValueError("Path-SGD is implemented for the fully connected model only "
                     "(max-pooling breaks the ones-input path-norm trick).")


def create_model(config: ml_collections.ConfigDict):
  norm = {"bn": "batch", "gn": "group"}.get(config.method, "none")
  final_bn = config.final_bn and config.method in ("baseline", "enorm")
  if config.model == "fc":
    return models.FullyConnected(depth=config.depth, width=config.width,
                                 use_bias=config.use_bias, norm=norm,
                                 gn_groups=config.gn_groups, final_bn=final_bn)
  return models.CifarNV(width=config.width_multiplier, use_bias=config.use_bias, norm=norm,
                        gn_groups=config.gn_groups, final_bn=final_bn)


def input_shape(config) -> tuple[int, ...]:
  return (1, 3072) if config.model == "fc" else (1, input_pipeline.CROP,
                                                 input_pipeline.CROP, 3)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  if config.lr_schedule == "linear":
    return optax.linear_schedule(config.learning_rate, config.end_learning_rate, total_steps)
  if config.lr_schedule == "quadratic":
    return optax.polynomial_schedule(config.learning_rate, config.end_learning_rate, 2,
                                     total_steps)
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use 'linear' or 'quadratic'.")


@dataclasses.dataclass(frozen=True)
class Setup:
  model: Any
  tx: optax.GradientTransformation
  graph: enorm_jax.RescalingGraph | None
  state: trainer.TrainState


def _model_params(params, method):
  return params["model"] if method == "enorm_impl" else params


def create_setup(config: ml_collections.ConfigDict, total_steps: int) -> Setup:
  """Model, optimizer and initial state for ``config.method``."""
  validate_config(config)
  model = create_model(config)
  variables = model.init(jax.random.key(config.seed), jnp.ones(input_shape(config)))
  params = variables["params"]
  graph = None
  if config.method in ("enorm", "enorm_impl"):
    graph = model.rescaling_graph(params)
  schedule = learning_rate_schedule(config, total_steps)
  momentum = config.momentum or None
  if config.method == "path_sgd":  # weight decay 0, as in the paper
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    tx = enorm_jax.path_sgd(schedule, apply, jnp.ones(input_shape(config)))
  else:
    decay = optax.add_decayed_weights(config.weight_decay)
    if config.method == "enorm_impl":  # no decay on the log-scales
      decay = optax.masked(decay, {"model": True, "log_scales": False})
      params = {"model": params, "log_scales": enorm_jax.init_log_scales(graph)}
    tx = optax.chain(decay, optax.sgd(schedule, momentum=momentum))
    if config.method == "enorm":
      tx = enorm_jax.enorm(tx, graph, c=config.c, cycles=config.enorm_cycles,
                           every_k=config.enorm_every_k)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             batch_stats=variables.get("batch_stats", {}),
                             opt_state=tx.init(params))
  return Setup(model, tx, graph, state)


def _apply(setup: Setup, params, batch_stats, images, train: bool):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    if train:
      logits, updates = setup.model.apply(variables, images, train=True,
                                          mutable=["batch_stats"])
      return logits, updates["batch_stats"]
  return setup.model.apply(variables, images, train=train), batch_stats


def train_step(setup: Setup, config, state: trainer.TrainState, batch):
  def loss_fn(params):
    logits, batch_stats = _apply(setup, _model_params(params, config.method),
                                 state.batch_stats, batch["image"], True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    total = loss
    if config.method == "enorm_impl":
      total = loss + config.impl_lambda * enorm_jax.implicit_energy(
          params["model"], params["log_scales"], setup.graph, c=config.c)
    return total, (loss, logits, batch_stats)

  grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = trainer.TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                                 opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  weights = _model_params(params, config.method)
  l2 = jnp.sqrt(sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(weights)))
  return new_state, {"loss": loss, "accuracy": accuracy, "param_l2": l2}


def eval_step(setup: Setup, config, state: trainer.TrainState, batch):
  logits, _ = _apply(setup, _model_params(state.params, config.method), state.batch_stats,
                     batch["image"], False)
  return trainer.classification_metrics(logits, batch["label"], batch["mask"])


def make_steps(setup: Setup, config, mesh):
  repl, data = trainer.replicated(mesh), trainer.data_sharded(mesh)
  train = jax.jit(functools.partial(train_step, setup, config), in_shardings=(repl, data),
                  out_shardings=(repl, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, setup, config), in_shardings=(repl, data),
                     out_shardings=repl)
  return train, evaluate


def evaluate_splits(eval_fn, state, ds, config, mesh, splits) -> dict[str, float]:
  """Accuracy and loss on each split (``<split>_acc``, ``<split>_loss``)."""
  batch_size = config.eval_batch_size
  trainer.check_batch_size(batch_size, mesh)
  out = {}
  for split in splits:
    totals = None
    for batch in input_pipeline.eval_batches(ds, split, config, batch_size):
      m = jax.device_get(eval_fn(state, trainer.shard_batch(batch, mesh)))
      totals = m if totals is None else {k: totals[k] + m[k] for k in m}
    out[f"{split}_acc"] = float(totals["top1"] / totals["count"])
    out[f"{split}_loss"] = float(totals["loss"] / totals["count"])
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if possible) and returns final metrics."""
  validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  trainer.check_batch_size(config.batch_size, mesh)
  trainer.check_workdir(workdir)
  ds = input_pipeline.load(config)
  per_epoch = input_pipeline.steps_per_epoch(ds, config.batch_size)
  total_steps = per_epoch * config.num_epochs
  setup = create_setup(config, total_steps)
  train_fn, eval_fn = make_steps(setup, config, mesh)
  splits = [s for s in ("validation", "test") if s in ds.splits]

  def batches(start_step):
    from experiments.common.data import prefetch
    return prefetch(input_pipeline.train_batches(ds, config, start_step))

  start = time.perf_counter()
  state, metrics = trainer.fit(
      setup.state, train_step=train_fn, batches=batches, mesh=mesh, total_steps=total_steps,
      steps_per_epoch=per_epoch, workdir=workdir,
      evaluate=lambda s: evaluate_splits(eval_fn, s, ds, config, mesh, splits),
      checkpoint_every_steps=config.checkpoint_every_steps or per_epoch,
      log_every_steps=min(config.log_every_steps, per_epoch),
      eval_every_epochs=config.eval_every_epochs, stop_at_step=config.stop_at_step,
      desc=f"{config.model}/{config.method}")
  metrics = dict(metrics)
  metrics["train_time_s"] = time.perf_counter() - start
  metrics["steps"] = int(jax.device_get(state.step))
  metrics["final_state"] = state
  return metrics


def param_checksum(params) -> float:
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))
