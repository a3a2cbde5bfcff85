r"""Time to trace a rescaling graph: ResNet-50 (identity skips, eval BN) at batch 1.

    python -m benchmarks.trace [--quick] [--json PATH]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import enorm_jax
from benchmarks import _common
from benchmarks.resnet50 import ResNet50
from enorm_jax.models import ResNet18C


def main():
  args = _common.parser(__doc__).parse_args()
  reps = 1 if args.quick else 3
  records = []
  for name, model in (("ResNet-18C", ResNet18C()), ("ResNet-50", ResNet50())):
    x = jnp.ones((1, 224, 224, 3))
    variables = model.init(jax.random.key(0), x)
    fn = lambda v, x, m=model: m.apply(v, x)
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      graph = enorm_jax.trace_graph(fn, variables, x)
      times.append(time.perf_counter() - start)
    records.append(dict(model=name, trace_s=statistics.median(times), groups=len(graph),
                        units=graph.num_units))
  _common.emit(records, ["model", "trace_s", "groups", "units"], args.json)


if __name__ == "__main__":
  main()
