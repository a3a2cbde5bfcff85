r"""FLOPs of one ImageNet ResNet-18C training step (XLA cost analysis), and an
ESTIMATE of the epoch time on accelerators derived from it.

    python -m benchmarks.flops [--batch_size 256] [--json PATH]

The estimate assumes a sustained fraction (`--utilization`) of each device's peak
throughput; it is not a measurement.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

import enorm_jax
from enorm_jax.models import ResNet18C

PEAK_TFLOPS = {"A100 (bf16)": 312.0, "A100 (tf32)": 156.0, "V100 (fp16)": 125.0,
               "TPU v4 chip (bf16)": 275.0}
IMAGENET_TRAIN = 1_281_167


def step_flops(batch_size: int, enorm: bool) -> float:
  model = ResNet18C(final_bn=True)
  x = jnp.ones((batch_size, 224, 224, 3))
  y = jnp.zeros((batch_size,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  if enorm:
    tx = enorm_jax.enorm(tx, model.rescaling_graph(params))

  def step(params, stats, opt_state):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    grads, new = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new, opt_state

  opt_state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(step).lower(params, stats, opt_state).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--utilization", type=float, default=0.1,
                 help="assumed fraction of peak FLOP/s sustained (ResNet-18 is small)")
  p.add_argument("--json")
  args = p.parse_args()
  plain, with_enorm = step_flops(args.batch_size, False), step_flops(args.batch_size, True)
  steps = IMAGENET_TRAIN // args.batch_size
  record = dict(batch_size=args.batch_size, gflops_per_step=plain / 1e9,
                enorm_extra_gflops=(with_enorm - plain) / 1e9, steps_per_epoch=steps,
                estimates_minutes_per_epoch={})
  for name, tflops in PEAK_TFLOPS.items():
    seconds = steps * with_enorm / (args.devices * tflops * 1e12 * args.utilization)
    record["estimates_minutes_per_epoch"][f"{args.devices}x {name}"] = seconds / 60
  print(json.dumps(record, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
