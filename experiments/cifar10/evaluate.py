"""Scores the newest checkpoint of a workdir on one split of any data directory."""

from __future__ import annotations

import ml_collections

from experiments.cifar10 import input_pipeline, train
from experiments.common import methods, trainer


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        split: str) -> dict[str, float]:
  train.validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  ds = input_pipeline.load(config)
  if split not in ds.splits:
    raise ValueError(f"split={split!r} is not available from this source; "
                     f"available: {sorted(ds.splits)}.")
  setup = train.create_setup(config, total_steps=1)
  state = trainer.Checkpoints(workdir).restore_latest(setup.state)
  if state is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints.")
  _, eval_fn = methods.make_steps(setup, config, mesh)
  metrics = train.evaluate_splits(eval_fn, state, ds, config, mesh, [split])
  return {"step": int(state.step), **metrics}
