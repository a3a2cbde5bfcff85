"""A REDUCED CIFAR-NV protocol that fits a 2-core CPU: NOT the paper's protocol.

Differences from `conv.py` (the paper's): half the width (widths 64/64/64,
128/128/128, 160, 160) and 8 epochs instead of 128, on the same 40k/10k split,
with the same schedule shape (quadratic decay to 1e-4 over the shortened run).
"""

from experiments.cifar10.configs import conv


def get_config():
  config = conv.get_config()
  config.width_multiplier = 0.5
  config.num_epochs = 8
  return config
