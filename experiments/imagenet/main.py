r"""ImageNet ResNet-18 (type C) entry point.

    python -m experiments.imagenet.main --workdir=workdirs/in_enorm \
        --config=experiments/imagenet/configs/default.py --config.method=enorm \
        --config.batch_size=256
Multi-host (one process per GPU host, a TPU pod slice, or local processes with
`experiments.launch`): add --distributed; see `experiments.common.distributed`.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from experiments.common import distributed
from experiments.imagenet import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.mark_flags_as_required(["workdir", "config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  distributed.initialize()
  _, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_main_process():
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  app.run(main)
