"""Table 2 on a CPU: CIFAR-NV at batch 32 without momentum, ranked over 3 seeds.

A REDUCED protocol, not the paper's (`conv.py`): a quarter of the width (hidden
widths 32/32/32, 64/64/64, 80, 80) and 8 epochs instead of 128: 10,000 steps,
24-31 minutes each for the five seed-2 runs on one core of the project's 2-core
CPU while the other core trained too; the paper's full width for 128 epochs would take
about 20 days there. Everything else is the
paper's: the 40k/10k split, batch 32, no momentum, weight decay 1e-3, the
quadratic decay to 1e-4 (compressed to the shorter run), the final BatchNorm on
the logits of the Baseline and ENorm nets, biases. Each method's learning rate is
searched on the validation split over the paper's grid {0.01, 0.05, 0.1} with
`SEARCH_EPOCHS`-epoch runs; GroupNorm uses the 32 groups its search chose on the
4-epoch protocol. Seeds share the data order across methods, so differences are
paired by seed. Its nets end at 72-80 % validation accuracy with their training
accuracy at the same level (the per-epoch curves in
`experiments/results/cifar10_conv_table2.md`): they have not fit the training set,
so this protocol ranks how fast the methods fit it. The full protocol (16 times
the epochs at 4 times the width) was not run here: how far its accuracies are from
these, and whether the ranking holds there, is not measured.
"""

from experiments.cifar10.configs import conv

METHODS = (("baseline", 1.0), ("bn", 1.0), ("gn", 1.0), ("enorm", 1.0), ("enorm", 1.2))
LEARNING_RATES = conv.LEARNING_RATES
SEARCH_EPOCHS = 2
SEEDS = (0, 1, 2)


def get_config():
  config = conv.get_config()
  config.width_multiplier = 0.25
  config.num_epochs = 8
  config.batch_size = 32
  config.momentum = 0.0
  config.gn_groups = 32
  return config
