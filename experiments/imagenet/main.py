r"""ImageNet ResNet-18 (type C) entry point.

    python -m experiments.imagenet.main --workdir=workdirs/in_enorm \
        --config=experiments/imagenet/configs/default.py --config.method=enorm \
        --config.batch_size=256
Multi-host (TPU pod slice, or one process per GPU host): add --distributed.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.imagenet import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (runs spanning several processes).")
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.mark_flags_as_required(["workdir", "config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  app.run(main)
