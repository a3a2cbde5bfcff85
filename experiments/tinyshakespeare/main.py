r"""Tiny-Shakespeare entry point, configured with ml_collections.

    python -m experiments.tinyshakespeare.main --workdir=workdirs/shakespeare_enorm \
        --config=experiments/tinyshakespeare/configs/default.py \
        --config.data_dir=../shared/data/tinyshakespeare --config.method=enorm
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.tinyshakespeare import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.mark_flags_as_required(["workdir", "config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.info("JAX devices: %s", jax.devices())
  _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  app.run(main)
