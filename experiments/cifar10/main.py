r"""CIFAR-10 entry point (train or evaluate), configured with ml_collections.

Train:
    python -m experiments.cifar10.main --workdir=workdirs/fc3_enorm \
        --config=experiments/cifar10/configs/fc.py --config.method=enorm --config.depth=3
Evaluate a checkpoint on any split of any ImageFolder (normalized with the
statistics of its training data, stored in the workdir), e.g. a folder holding
only ``test/<class>/*.jpg``:
    python -m experiments.cifar10.main --mode=evaluate --workdir=workdirs/fc3_enorm \
        --config=experiments/cifar10/configs/fc.py --config.method=enorm --config.depth=3 \
        --split=test --eval_data_dir=/data/cifar10_test
Multi-host (one process per GPU host, a TPU pod slice, or local processes with
`experiments.launch`): add --distributed; see `experiments.common.distributed`.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cifar10 import train
from experiments.common import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "What to do.")
flags.DEFINE_string("split", "validation", "Split to score in evaluate mode.")
flags.DEFINE_string("eval_data_dir", None, "Evaluate mode: the ImageFolder to score ('' "
                    "for tfds); default: the training data, config.data_dir.")
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.mark_flags_as_required(["workdir", "config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  if FLAGS.mode == "train":
    _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    metrics = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.split,
                                        FLAGS.eval_data_dir)
  if distributed.is_main_process():
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  app.run(main)
