"""A REDUCED CIFAR-NV protocol that fits a 2-core CPU: NOT the paper's protocol.

Differences from `conv.py` (the paper's): a quarter of the width (hidden widths
32/32/32, 64/64/64, 80, 80) and 4 epochs instead of 128, one seed instead of 5,
on the same 40k/10k split, with the same schedule shape (quadratic decay to 1e-4
over the shortened run). The learning rate is not searched: every cell runs at
0.05, and the momentum-0.9 cells also at 0.01 (momentum makes the effective step
10x larger). GroupNorm's group count G is searched over the paper's grid at
batch 32 without momentum (see `experiments/cifar10/sweep.py`); each layer uses
the largest group count <= G that divides its width. The full protocol does not
fit a CPU (experiments/results/README.md gives the timings).
"""

from experiments.cifar10.configs import conv


def get_config():
  config = conv.get_config()
  config.width_multiplier = 0.25
  config.num_epochs = 4
  return config
