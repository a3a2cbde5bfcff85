r"""Training-step cost of ENorm on the tiny-Shakespeare transformer, side by side.

    python -m benchmarks.lm_step [--quick] [--json PATH]

The experiment's own jitted step (`experiments.tinyshakespeare.train`) at its
default config (4 layers, width 128, batch 32 x 128 characters), one device:
AdamW, ``enorm(AdamW)`` on every traced group, and on the MLP groups only.
Overheads are fractions of AdamW's median step time, all variants timed in
alternation (one step of each per round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from experiments.common import trainer
from experiments.tinyshakespeare import train
from experiments.tinyshakespeare.configs import default

VOCAB_SIZE = 65  # tiny Shakespeare's characters


def variant_step(method: str, mesh, batch):
  """``(step, state)`` for `_common.interleaved_ms`, and the number of rescaled units."""
  config = default.get_config()
  config.method = method
  model = train.create_model(config, VOCAB_SIZE)
  params = model.init(jax.random.key(0), jnp.zeros((1, config.context), jnp.int32))["params"]
  graph = train.rescaling_graph(model, params, config) if method != "adamw" else None
  tx = train.create_optimizer(config, graph)
  state = trainer.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                             opt_state=tx.init(params))
  train_step, _ = train.make_steps(model, tx, mesh)
  return (lambda s: train_step(s, batch)[0], jax.device_put(state, trainer.replicated(mesh))
          ), graph.num_units if graph is not None else 0


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--reps", type=int, default=0, help="timed repetitions per variant")
  args = parser.parse_args()
  reps = args.reps or (3 if args.quick else 15)
  config = default.get_config()
  mesh = trainer.make_mesh(1)
  tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, (config.batch_size,
                                                             config.context + 1))
  batch = trainer.shard_batch({"tokens": tokens.astype(np.int32)}, mesh)
  steps, units = {}, {}
  for method in train.METHODS:
    steps[method], units[method] = variant_step(method, mesh, batch)
  ms = _common.interleaved_ms(steps, reps)
  record = dict(model="DecoderLM-4x128", batch_size=config.batch_size, context=config.context,
                reps=reps, **{f"{m}_ms": ms[m] for m in train.METHODS},
                **{f"{m}_units": units[m] for m in train.METHODS[1:]},
                **{f"{m}_overhead": ms[m] / ms["adamw"] - 1 for m in train.METHODS[1:]})
  _common.emit([record], ["model", "adamw_ms", "enorm_ms", "enorm_overhead", "enorm_units",
                          "enorm_mlp_ms", "enorm_mlp_overhead", "enorm_mlp_units"], args.json)


if __name__ == "__main__":
  main()
