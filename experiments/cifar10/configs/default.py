"""Default CIFAR-10 config: every field, with the fully connected paper settings."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.data_dir = ""                         # an ImageFolder dir; '' -> tfds.load('cifar10')
  config.tfds_data_dir = ""
  config.cache_dir = ""                        # '' -> ~/.cache/enorm_jax
  config.num_validation = 10_000
  config.split_seed = 0
  config.train_subset = 0                      # > 0: use only this many train images
  # Model.
  config.model = "fc"                          # 'fc' or 'cifar_nv'
  config.depth = 3                             # FC: number of 500x500 intermediary layers
  config.width = 500                           # FC: hidden width
  config.width_multiplier = 1.0                # CIFAR-NV: scales every hidden width
  config.use_bias = True
  config.final_bn = False                      # BatchNorm on the logits (Baseline/ENorm)
  # Method: baseline | bn | gn | enorm | enorm_impl | path_sgd.
  config.method = "baseline"
  config.c = 1.0                               # ENorm asymmetric scaling
  config.enorm_cycles = 1
  config.enorm_every_k = 1
  config.enorm_bias_steps = "balanced"         # or "unbalanced" (see enorm_jax.enorm)
  config.gn_groups = 10
  config.impl_lambda = 1e-3                    # ENorm-Impl regularizer weight
  # Optimization.
  config.batch_size = 256
  config.num_epochs = 60
  config.learning_rate = 0.01
  config.lr_schedule = "linear"                # 'linear' to 0, or 'quadratic' to end_lr
  config.end_learning_rate = 0.0
  config.momentum = 0.0
  config.weight_decay = 1e-3
  config.seed = 0
  # Bookkeeping.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0            # 0 -> once per epoch
  config.eval_every_epochs = 1
  config.eval_batch_size = 1000
  config.num_devices = 0                       # 0 -> all devices
  config.bn_scope = "global"                   # BatchNorm statistics: "global" or "device"
  config.stop_at_step = 0                      # > 0: stop there, as if preempted (tests)
  return config
