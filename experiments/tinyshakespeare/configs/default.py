"""Default tiny-Shakespeare config: a 4-layer, width-128 character-level decoder."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data: a folder holding input.txt ('' -> tfds.load('tiny_shakespeare')).
  config.data_dir = ""
  config.validation_fraction = 0.1             # the last 10 % of the text
  # Model: 'gpt' (pre-LayerNorm, ReLU MLP) or 'llama' (RMSNorm, rotary embeddings,
  # grouped-query attention with num_kv_heads, SwiGLU of llama_mlp_width, no biases,
  # layers stacked with nn.scan; about the GPT model's parameter count).
  config.architecture = "gpt"
  config.num_layers = 4
  config.width = 128
  config.num_heads = 4
  config.mlp_width = 512
  config.num_kv_heads = 2                      # llama only
  config.llama_mlp_width = 384                 # llama only: 804k params, GPT 826k
  config.context = 128
  # Method: 'adamw', 'enorm' (enorm(adamw), every traced group), 'enorm_mlp'
  # (enorm(adamw) on the MLP hidden units only) or 'enorm_attn' (on every group but
  # the MLP's: attention and norm gains).
  config.method = "adamw"
  config.c = 1.0
  # Optimization.
  config.batch_size = 32
  config.num_steps = 1000                      # ~4 passes over the training text
  config.learning_rate = 3e-3
  config.warmup_steps = 100                    # then cosine decay to 0
  config.weight_decay = 0.1
  # Per-kind learning-rate multipliers, 'kind=multiplier,...' with kinds as
  # `train.weight_kind` names them (query, key, fc1, attn_norm...); '' for none.
  config.lr_multipliers = ""
  config.seed = 0
  # Bookkeeping.
  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.eval_batches = 20                     # validation windows scored per evaluation
  config.num_devices = 0                       # 0 -> all devices
  return config
