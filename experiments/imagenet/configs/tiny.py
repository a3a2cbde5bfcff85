"""A tiny configuration for tests and smoke runs on a CPU (64x64 images, narrow net)."""

from experiments.imagenet.configs import default


def get_config():
  config = default.get_config()
  config.image_size = 32
  config.resize_size = 36
  config.num_classes = 10
  config.widths = (8, 8, 16, 16)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.learning_rate = 0.05
  config.weight_decay = 1e-4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.shuffle_buffer = 256
  config.cache = True
  return config
