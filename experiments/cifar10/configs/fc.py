"""§6.1: fully connected nets on flattened CIFAR-10 (60 epochs, SGD, batch 256)."""

from experiments.cifar10.configs import default

LEARNING_RATES = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1)
SEEDS = (0, 1, 2)
DEPTHS = (1, 3, 5, 10, 15, 19)
GN_GROUPS = (5, 10, 20, 50)


def get_config():
  config = default.get_config()
  config.model = "fc"
  config.num_epochs = 60
  config.batch_size = 256
  config.momentum = 0.0
  config.weight_decay = 1e-3
  config.lr_schedule = "linear"
  config.end_learning_rate = 0.0
  # No biases for any method, as in the official code: with biases, ENorm-1.2 diverges
  # from depth 11 on (experiments/results/README.md, "Biases in deep ENorm nets").
  config.use_bias = False
  return config
