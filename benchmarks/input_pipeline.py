r"""CIFAR-10 input pipeline speed against the training step it feeds.

    python -m benchmarks.input_pipeline [--data_dir ../shared/data/cifar10] [--json PATH]

Reports the load time (decode on the first call, then the cached arrays), the
median time to build one training batch (FC: flatten; conv: crop + flip), and
the median jitted training-step time of the model it feeds, in one process.
"""

from __future__ import annotations

import statistics
import time

import jax
import ml_collections

from benchmarks import _common
from experiments.cifar10 import input_pipeline, train
from experiments.cifar10.configs import conv, fc
from experiments.common import methods, trainer


def _median_batch_ms(ds, config, n=30):
  stream = input_pipeline.train_batches(ds, config)
  next(stream)
  times = []
  for _ in range(n):
    t = time.perf_counter()
    next(stream)
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def _median_step_ms(ds, config, n=10):
  mesh = trainer.make_mesh(1)
  setup = train.create_setup(config, total_steps=100)
  step, _ = methods.make_steps(setup, config, mesh)
  batch = trainer.shard_batch(next(input_pipeline.train_batches(ds, config)), mesh)
  state = jax.device_put(setup.state, trainer.replicated(mesh))
  ms, _ = _common.median_ms(lambda s: step(s, batch)[0], state, n)
  return ms


def main():
  p = _common.parser(__doc__)
  p.add_argument("--data_dir", default="../shared/data/cifar10")
  args = p.parse_args()
  records = []
  for name, module, overrides in (("FC-15, B=256", fc, dict(depth=15, method="enorm")),
                                  ("CIFAR-NV, B=32", conv, dict(batch_size=32,
                                                                method="enorm"))):
    config = module.get_config()
    config.data_dir = args.data_dir
    config.update(ml_collections.ConfigDict(overrides))
    start = time.perf_counter()
    ds = input_pipeline.load(config)
    load_s = time.perf_counter() - start
    batch_ms = _median_batch_ms(ds, config, 10 if args.quick else 30)
    step_ms = _median_step_ms(ds, config, 3 if args.quick else 10)
    records.append(dict(config=name, load_s=load_s, batch_ms=batch_ms, step_ms=step_ms,
                        batch_over_step=batch_ms / step_ms))
  _common.emit(records, ["config", "load_s", "batch_ms", "step_ms", "batch_over_step"],
               args.json)


if __name__ == "__main__":
  main()
