"""ImageNet ResNet-18 (type C), the paper's §6.3 protocol.

90 epochs, SGD with momentum 0.9, Kaiming init, learning rate 0.1 * B / 256 decayed
quadratically to 1e-5, weight decay by batch size (1e-4 for B = 128 and 256,
10^-4.5 for 64, 1e-5 for 32). Choose B with --config.batch_size in {32, 64, 128, 256}.

`bn_scope`: 'device' computes BatchNorm statistics on each device's shard of the
batch, as the paper does per GPU; 'global' computes them over the global batch
(one synchronized BatchNorm). The running averages are averaged over devices in
both cases. The BatchNorm after the classifier (Baseline, ENorm, ENorm-Impl) shares its
statistics across devices whatever `bn_scope` says, as the paper's does (§6.3),
and every BatchNorm computes its variance as E[(x - E[x])^2]: with 2 examples per
device, E[x^2] - E[x]^2 of logits sharing a large common value cancels to 0 in
float32 and sent training to NaN on some seeds.
"""

import ml_collections

WEIGHT_DECAY = {32: 1e-5, 64: 10 ** -4.5, 128: 1e-4, 256: 1e-4}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data_dir = ""              # ImageFolder directory; '' -> tfds.load('imagenet2012')
  config.tfds_data_dir = ""         # tfds data_dir (manual_dir archives for imagenet2012)
  config.num_validation = 0         # ImageFolder without a validation split: hold out N
  config.split_seed = 0
  config.image_size = 224
  config.resize_size = 256          # eval: resize the shorter side, then centre crop
  config.num_classes = 1000
  config.method = "enorm"           # baseline | bn | gn | enorm | enorm_impl
  config.c = 1.0
  config.enorm_cycles = 1
  config.enorm_every_k = 1
  config.enorm_bias_steps = "balanced"         # or "unbalanced" (see enorm_jax.enorm)
  config.gn_groups = 32
  config.final_bn = True            # BatchNorm after the classifier (Baseline, ENorm)
  config.use_bias = True
  config.widths = (64, 128, 256, 512)
  config.stem = "imagenet"
  config.impl_lambda = 1e-4
  config.bn_scope = "device"        # 'device' (paper: per GPU) or 'global'
  config.batch_size = 256
  config.num_epochs = 90
  config.learning_rate = -1.0       # < 0: 0.1 * batch_size / 256
  config.end_learning_rate = 1e-5
  config.momentum = 0.9
  config.weight_decay = -1.0        # < 0: WEIGHT_DECAY[batch_size]
  config.seed = 0
  config.num_devices = 0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.eval_every_epochs = 1
  config.eval_batch_size = 256
  config.steps_per_epoch = 0        # > 0: override (tiny tests)
  config.stop_at_step = 0
  config.shuffle_buffer = 16_384
  config.cache = False              # cache decoded training data in memory (small sets)
  return config
