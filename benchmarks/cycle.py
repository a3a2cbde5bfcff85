r"""One ENorm cycle vs. the memory floor (read + write every parameter once).

    python -m benchmarks.cycle [--quick] [--json PATH]

``ratio = cycle_ms / floor_ms``: both are medians of jitted, donated calls,
measured side by side in this process.
"""

from __future__ import annotations

import jax

import enorm_jax
from benchmarks import _common


def main():
  args = _common.parser(__doc__).parse_args()
  reps = 5 if args.quick else 30
  records = []
  for name, model, shape in _common.paper_models(args.quick):
    params = _common.init_params(model, shape)
    graph = model.rescaling_graph(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    floor = jax.jit(lambda p: jax.tree.map(lambda w: w * 1.0001, p), donate_argnums=0)
    row = dict(model=name, params_m=n / 1e6)
    row["floor_ms"], params = _common.median_ms(floor, params, reps)
    for schedule in ("sequential", "parallel"):
      cycle = jax.jit(lambda p, s=schedule, g=graph: enorm_jax.balance(p, g, schedule=s)[0],
                      donate_argnums=0)
      ms, params = _common.median_ms(cycle, params, reps)
      row[f"cycle_ms_{schedule}"] = ms
    row["cycle_ms"] = min(row["cycle_ms_sequential"], row["cycle_ms_parallel"])
    row["ratio"] = row["cycle_ms"] / row["floor_ms"]
    records.append(row)
  _common.emit(records, ["model", "params_m", "floor_ms", "cycle_ms_sequential",
                         "cycle_ms_parallel", "ratio"], args.json)


if __name__ == "__main__":
  main()
