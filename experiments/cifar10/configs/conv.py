"""§6.2: the fully convolutional CIFAR-NV net, the paper's full protocol (128 epochs)."""

from experiments.cifar10.configs import default

LEARNING_RATES = (0.01, 0.05, 0.1)
BATCH_SIZES = (8, 16, 32, 64, 128, 256)
MOMENTUMS = (0.0, 0.9)
GN_GROUPS = (4, 8, 16, 32, 64)


def get_config():
  config = default.get_config()
  config.model = "cifar_nv"
  config.num_epochs = 128
  config.batch_size = 128
  config.momentum = 0.9
  config.weight_decay = 1e-3
  config.learning_rate = 0.05
  config.lr_schedule = "quadratic"
  config.end_learning_rate = 1e-4
  config.final_bn = True
  config.gn_groups = 32
  config.eval_batch_size = 500
  return config
