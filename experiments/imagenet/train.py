"""ImageNet ResNet-18 (type C) training with the paper's §6.3 protocol.

Shares the trainer (mesh, orbax, metrics, progress) and the method setups with
the CIFAR-10 experiment. Multi-host: every process runs this with the same
config; each reads its own shard and the global batch is assembled on the mesh.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from enorm_jax import models
from experiments.common import methods, trainer
from experiments.imagenet import input_pipeline
from experiments.imagenet.configs.default import WEIGHT_DECAY

IMAGENET_METHODS = tuple(m for m in methods.METHODS if m != "path_sgd")  # Path-SGD: FC only


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills the batch-size-dependent defaults (learning rate, weight decay) and checks."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.method not in IMAGENET_METHODS:
    raise ValueError(f"config.method={config.method!r}: use one of {IMAGENET_METHODS}.")
  if config.learning_rate < 0:
    config.learning_rate = 0.1 * config.batch_size / 256
  if config.weight_decay < 0:
    if config.batch_size not in WEIGHT_DECAY:
      raise ValueError(f"No paper weight decay for batch_size={config.batch_size}; use one "
                       f"of {sorted(WEIGHT_DECAY)} or set config.weight_decay.")
    config.weight_decay = WEIGHT_DECAY[config.batch_size]
  if config.bn_scope not in ("device", "global"):
    raise ValueError(f"config.bn_scope={config.bn_scope!r}: use 'device' or 'global'.")
  methods.check_method(config)
  return config


def create_model(config):
  return models.ResNet18C(num_classes=config.num_classes, stem=config.stem,
                          widths=tuple(config.widths), use_bias=config.use_bias,
                          norm=methods.norm_of(config.method), gn_groups=config.gn_groups,
                          final_bn=methods.final_bn_of(config),
                          final_bn_axis_name=methods.final_bn_axis_of(config))


def create_setup(config, total_steps: int) -> methods.Setup:
  schedule = optax.polynomial_schedule(config.learning_rate, config.end_learning_rate, 2,
                                       total_steps)
  example = jnp.ones((1, config.image_size, config.image_size, 3))
  return methods.create_setup(config, create_model(config), example, schedule)


def _host_batches(dataset):
  for batch in dataset.as_numpy_iterator():
    yield batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[trainer.TrainState, dict[str, Any]]:
  config = resolve_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  trainer.check_batch_size(config.batch_size, mesh)
  trainer.check_workdir(workdir)
  sizes = input_pipeline.splits(config)
  if "train" not in sizes:
    raise ValueError(f"The data source has no 'train' split (found {sorted(sizes)}).")
  local_batch = config.batch_size // jax.process_count()
  per_epoch = config.steps_per_epoch or sizes["train"] // config.batch_size
  total_steps = per_epoch * config.num_epochs
  setup = create_setup(config, total_steps)
  train_fn, eval_fn = methods.make_steps(setup, mesh)
  eval_splits = [s for s in sizes if s != "train"]

  def evaluate(state):
    local = config.eval_batch_size // jax.process_count()
    return methods.evaluate_splits(eval_fn, state, mesh, {
        s: (lambda s=s: _host_batches(input_pipeline.eval_dataset(config, s, local)))
        for s in eval_splits})

  start = time.perf_counter()
  state, metrics = trainer.fit(
      setup.state, train_step=train_fn,
      batches=lambda step: _host_batches(input_pipeline.train_dataset(config, local_batch, step)),
      mesh=mesh, total_steps=total_steps, steps_per_epoch=per_epoch, workdir=workdir,
      evaluate=evaluate, checkpoint_every_steps=config.checkpoint_every_steps,
      log_every_steps=min(config.log_every_steps, per_epoch),
      eval_every_epochs=config.eval_every_epochs, stop_at_step=config.stop_at_step,
      images_per_step=config.batch_size, desc=f"imagenet/{config.method}")
  metrics = dict(metrics)
  metrics["train_time_s"] = time.perf_counter() - start
  metrics["steps"] = int(jax.device_get(state.step))
  return state, metrics


def median_error_final_epochs(metrics_path: str, split: str = "validation",
                              epochs: int = 5) -> dict[str, float]:
  """The paper's figure: median top-1 and top-5 error over the final ``epochs`` evaluations."""
  import json
  rows = [json.loads(line) for line in open(metrics_path)]
  rows = [r for r in rows if f"{split}_acc" in r][-epochs:]
  return {"top1_error": float(np.median([1 - r[f"{split}_acc"] for r in rows])),
          "top5_error": float(np.median([1 - r[f"{split}_top5"] for r in rows]))}
