"""Scores the newest checkpoint of a workdir on any split of any data directory."""

from __future__ import annotations

import jax
import ml_collections

from experiments.cifar10 import input_pipeline, train
from experiments.common import methods, trainer


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str,
                        data_dir: str | None = None) -> dict[str, float]:
  """Scores ``split`` of ``data_dir`` (default: the training data, ``config.data_dir``).

  Images are normalized with the statistics of the data the checkpoint was trained
  on (stored in the workdir), never with those of the data being scored.
  """
  train.validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  data_dir = config.data_dir if data_dir is None else data_dir
  ds = input_pipeline.load_for_evaluation(config, workdir, data_dir, split)
  setup = train.create_setup(config, total_steps=1)
  template = jax.device_put(setup.state, trainer.replicated(mesh))  # any process count
  state = trainer.Checkpoints(workdir).restore_latest(template)
  if state is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints.")
  _, eval_fn = methods.make_steps(setup, config, mesh)
  metrics = train.evaluate_splits(eval_fn, state, ds, config, mesh, [split])
  return {"step": int(state.step), **metrics}
