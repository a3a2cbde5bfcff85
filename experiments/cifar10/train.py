"""CIFAR-10 training and evaluation for every method of the paper.

Methods (``config.method``): see `experiments.common.methods`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from enorm_jax import models
from experiments.cifar10 import input_pipeline
from experiments.common import distributed, methods, trainer

MODELS = ("fc", "cifar_nv")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up, with the fix, on settings that cannot work."""
  methods.check_method(config)
  if config.model not in MODELS:
    raise ValueError(f"config.model={config.model!r} is unknown; use one of {MODELS}.")
  if config.method == "path_sgd" and config.model != "fc":
    raise ValueError("Path-SGD is implemented for the fully connected model only "
                     "(max-pooling breaks the ones-input path-norm trick).")


def create_model(config: ml_collections.ConfigDict):
  norm, final_bn = methods.norm_of(config.method), methods.final_bn_of(config)
  final_bn_axis = methods.final_bn_axis_of(config)
  if config.model == "fc":
    return models.FullyConnected(depth=config.depth, width=config.width,
                                 use_bias=config.use_bias, norm=norm,
                                 gn_groups=config.gn_groups, final_bn=final_bn,
                                 final_bn_axis_name=final_bn_axis)
  return models.CifarNV(width=config.width_multiplier, use_bias=config.use_bias, norm=norm,
                        gn_groups=config.gn_groups, final_bn=final_bn,
                        final_bn_axis_name=final_bn_axis)


def input_shape(config) -> tuple[int, ...]:
  if config.model == "fc":
    return (1, 3072)
  return (1, input_pipeline.CROP, input_pipeline.CROP, 3)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  if config.lr_schedule == "linear":
    return optax.linear_schedule(config.learning_rate, config.end_learning_rate, total_steps)
  if config.lr_schedule == "quadratic":
    return optax.polynomial_schedule(config.learning_rate, config.end_learning_rate, 2,
                                     total_steps)
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use 'linear' or 'quadratic'.")


def create_setup(config: ml_collections.ConfigDict, total_steps: int) -> methods.Setup:
  """Model, optimizer and initial state (``config`` already validated)."""
  return methods.create_setup(config, create_model(config), jnp.ones(input_shape(config)),
                              learning_rate_schedule(config, total_steps))


def evaluate_splits(eval_fn, state, ds, config, mesh, splits) -> dict[str, float]:
  trainer.check_batch_size(config.eval_batch_size, mesh)
  return methods.evaluate_splits(eval_fn, state, mesh, {
      s: (lambda s=s: input_pipeline.eval_batches(ds, s, config, config.eval_batch_size))
      for s in splits})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[trainer.TrainState, dict[str, Any]]:
  """Trains ``config`` in ``workdir`` (resuming if possible); returns the final state
  and the final metrics."""
  validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  trainer.check_batch_size(config.batch_size, mesh)
  trainer.check_workdir(workdir)
  ds = input_pipeline.load(config)
  if distributed.is_main_process():
    input_pipeline.save_stats(ds, workdir)
  per_epoch = input_pipeline.steps_per_epoch(ds, config.batch_size)
  total_steps = per_epoch * config.num_epochs
  setup = create_setup(config, total_steps)
  train_fn, eval_fn = methods.make_steps(setup, mesh)
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
  return state, metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str,
                        data_dir: str | None = None) -> dict[str, float]:
  """Scores the newest checkpoint of ``workdir`` on ``split`` of ``data_dir``
  (default: the training data, ``config.data_dir``).

  Images are normalized with the statistics of the data the checkpoint was trained
  on (stored in the workdir), never with those of the data being scored.
  """
  validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  data_dir = config.data_dir if data_dir is None else data_dir
  ds = input_pipeline.load_for_evaluation(config, workdir, data_dir, split)
  setup = create_setup(config, total_steps=1)
  template = jax.device_put(setup.state, trainer.replicated(mesh))  # any process count
  state = trainer.Checkpoints(workdir).restore_latest(template)
  if state is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints.")
  _, eval_fn = methods.make_steps(setup, mesh)
  metrics = evaluate_splits(eval_fn, state, ds, config, mesh, [split])
  return {"step": int(state.step), **metrics}
