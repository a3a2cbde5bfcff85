r"""Training-step cost of ENorm on the tiny-Shakespeare decoders, side by side.

    python -m benchmarks.lm_step [--quick] [--json PATH] [--architectures gpt,llama]
                                 [--reps N] [--cycle_reps N] [--placements K]
                                 [--methods adamw,enorm,...]

The experiment's own jitted step (`experiments.tinyshakespeare.train`) at its
default config (4 layers, width 128, batch 32 x 128 characters), one device, for
the GPT-style and the Llama-style model: AdamW, ``enorm(AdamW)`` on every traced
group, on the MLP groups only, on the others (attention and norms) (all three with
the experiment's ``check_applied='record'``), and on every group with the check
raising inside the step (``check_applied=True``) and with no check. Then, in
rounds of their own (``--cycle_reps``, as `benchmarks.cycle` times them: a few
rounds between 400 ms steps leave a 1 ms call too few samples, with cold caches):
one `balance` cycle on every group (params donated) and the floor, a jitted pass
that reads and writes every parameter once.

Every variant is compiled once and timed in alternation (one call of each per
round) on ``--placements`` fresh copies of its state, ``--reps`` rounds each: on
this CPU a program's speed depends on where its buffers lie (`_common.placements_ms`),
so a variant's time is the median over placements of their median step times.
An overhead is the median over placements of the variant's time over AdamW's in
the same rounds, minus 1, with a 95 % bootstrap interval over the placements; the
cycle against the floor likewise. The records keep every placement's medians.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

import enorm_jax
from benchmarks import _common
from experiments.common import trainer
from experiments.tinyshakespeare import train
from experiments.tinyshakespeare.configs import default

VOCAB_SIZE = 65  # tiny Shakespeare's characters
UNCHECKED, RAISING = "enorm_unchecked", "enorm_raising"


def variant_step(architecture: str, method: str, mesh, batch):
  """``(step, state)`` for `_common.placements_ms`, and the graph (None for AdamW)."""
  config = default.get_config()
  config.architecture = architecture
  config.method = "enorm" if method in (UNCHECKED, RAISING) else method
  model = train.create_model(config, VOCAB_SIZE)
  params = model.init(jax.random.key(0), jnp.zeros((1, config.context), jnp.int32))["params"]
  graph = train.rescaling_graph(model, params, config) if method != "adamw" else None
  tx = train.create_optimizer(config, graph)
  if method in (UNCHECKED, RAISING):
    adamw = train.create_optimizer(default.get_config(), None)
    tx = enorm_jax.enorm(adamw, graph, c=config.c, check_applied=method == RAISING)
  state = trainer.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                             opt_state=tx.init(params))
  train_step, _ = train.make_steps(model, tx, mesh)
  return (lambda s: train_step(s, batch)[0], jax.device_put(state, trainer.replicated(mesh))
          ), graph


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--reps", type=int, default=0, help="timed rounds per placement")
  parser.add_argument("--placements", type=int, default=0,
                      help="fresh copies of every state, each timed --reps rounds")
  parser.add_argument("--architectures", default="gpt,llama")
  parser.add_argument("--methods", default="", help="the variants to time (AdamW always)")
  parser.add_argument("--cycle_reps", type=int, default=0,
                      help="rounds of the cycle and the floor per placement")
  args = parser.parse_args()
  reps = args.reps or (2 if args.quick else 6)
  placements = args.placements or (2 if args.quick else 16)
  cycle_reps = args.cycle_reps or (10 if args.quick else 50)
  config = default.get_config()
  mesh = trainer.make_mesh(1)
  tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, (config.batch_size,
                                                             config.context + 1))
  batch = trainer.shard_batch({"tokens": tokens.astype(np.int32)}, mesh)
  methods = list(train.METHODS) + [RAISING, UNCHECKED]
  if args.methods:
    methods = ["adamw"] + [m for m in args.methods.split(",") if m != "adamw"]
    unknown = set(methods) - set(train.METHODS) - {RAISING, UNCHECKED}
    if unknown or "enorm" not in methods:
      parser.error(f"--methods: {sorted(unknown)} unknown, or enorm (whose graph the "
                   "cycle balances) missing")
  records = []
  for architecture in args.architectures.split(","):
    steps, graphs = {}, {}
    for method in methods:
      steps[method], graphs[method] = variant_step(architecture, method, mesh, batch)
    params, graph = steps["adamw"][1].params, graphs["enorm"]
    cycle = {"cycle": (jax.jit(lambda p: enorm_jax.balance(p, graph)[0], donate_argnums=0),
                       params),
             "floor": (jax.jit(lambda p: jax.tree.map(lambda w: w * 1.0001, p),
                               donate_argnums=0), params)}
    cycle_ms = _common.placements_ms(cycle, placements, cycle_reps)
    step_ms = _common.placements_ms(steps, placements, reps)
    ms = {name: statistics.median(t) for name, t in {**step_ms, **cycle_ms}.items()}
    ratio, low, high = _common.paired_ratio(cycle_ms["cycle"], cycle_ms["floor"])
    record = dict(model=architecture, reps=reps, placements=placements, cycle_reps=cycle_reps,
                  adamw_ms=ms["adamw"], cycle_ms=ms["cycle"], floor_ms=ms["floor"],
                  cycle_share=ms["cycle"] / ms["adamw"],
                  cycle_floor_ratio=ratio, cycle_floor_interval=[low, high],
                  placement_ms={**step_ms, **cycle_ms})
    for m in methods[1:]:
      ratio, low, high = _common.paired_ratio(step_ms[m], step_ms["adamw"])
      record[f"{m}_ms"] = ms[m]
      record[f"{m}_units"] = graphs[m].num_units
      record[f"{m}_overhead"] = ratio - 1
      record[f"{m}_overhead_interval"] = [low - 1, high - 1]
    records.append(record)
  _common.emit(records, ["model", "adamw_ms", "cycle_share", "cycle_floor_ratio"]
               + [f"{m}_overhead" for m in methods[1:]], args.json)


if __name__ == "__main__":
  main()
