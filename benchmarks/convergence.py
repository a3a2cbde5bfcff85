r"""Cycles and time for ENorm to reach a 1e-6 relative gap to the optimum.

    python -m benchmarks.convergence [--quick] [--json PATH]

Models: the Appendix-A network (20 layers of 500 x 500, layer 6 x 1.2, layer 12
x 0.8) and a random ResNet-18 with type-C skips. The optimum ``E*`` is the
energy after ``--long_cycles`` cycles (float64 energy of the float32 weights);
for the Appendix-A chain it is checked against an independent float64 numpy
implementation of Algorithm 1 run as long. The gap after ``k`` cycles is
``(E_k - E*) / E*`` after one ``balance(cycles=k)`` call; ``cycles`` is the
smallest ``k`` with gap <= ``--gap`` (the gap falls monotonically), and ``ms``
the median time of that jitted, donated call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import enorm_jax
from benchmarks import _common
from experiments.appendix_a import unbalanced_network
from enorm_jax.models import ResNet18C


def float64_energy(params, graph) -> float:
  paths = {r.path for g in graph for r in g.producers + g.consumers}
  leaves = enorm_jax.leaves_by_path(params)
  return float(sum(np.sum(np.asarray(leaves[p], np.float64) ** 2) for p in paths))


def numpy_chain_optimum(params, cycles: int) -> float:
  """Algorithm 1 in float64 numpy (independent of enorm_jax), run ``cycles`` times."""
  ws = [np.asarray(params[f"Dense_{k}"]["kernel"], np.float64) for k in range(len(params))]
  for _ in range(cycles):
    for k in range(len(ws) - 1):
      d = np.sqrt(np.sqrt(np.sum(ws[k + 1] ** 2, axis=1) / np.sum(ws[k] ** 2, axis=0)))
      ws[k], ws[k + 1] = ws[k] * d, ws[k + 1] / d[:, None]
  return float(sum(np.sum(w ** 2) for w in ws))


def cycles_to_gap(params, graph, schedule, e_star, gap, max_cycles):
  """The fewest cycles of one `balance` call that reach ``gap`` (doubling, then bisection).

  Cycles run inside one call, as a user balancing a network would run them; the
  weights are written once, at the end.
  """
  run = jax.jit(lambda p, n: enorm_jax.balance(p, graph, cycles=n, schedule=schedule)[0])

  def reached(n):
    return (float64_energy(run(params, n), graph) - e_star) / e_star <= gap

  hi = 1
  while not reached(hi):
    if hi >= max_cycles:
      return None
    hi = min(2 * hi, max_cycles)
  lo = hi // 2  # not reached (or 0)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if reached(mid) else (mid, hi)
  return hi


def models(quick: bool):
  layers, width = (20, 100) if quick else (20, 500)
  chain = unbalanced_network(layers, width)
  yield ("Appendix-A", chain,
         enorm_jax.chain_graph(chain, [f"Dense_{k}" for k in range(layers)]), True)
  resnet = ResNet18C(widths=(16, 32, 64, 128)) if quick else ResNet18C()
  params = _common.init_params(resnet, (1, 64, 64, 3))
  yield "ResNet-18C", params, resnet.rescaling_graph(params), False


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--gap", type=float, default=1e-6, help="target relative gap")
  parser.add_argument("--long_cycles", type=int, default=0,
                      help="cycles of the long run that defines the optimum")
  parser.add_argument("--max_cycles", type=int, default=1000)
  args = parser.parse_args()
  long_cycles = args.long_cycles or (500 if args.quick else 2000)
  reps = 3 if args.quick else 10
  records = []
  for name, params, graph, is_chain in models(args.quick):
    long = jax.jit(lambda p, g=graph: enorm_jax.balance(p, g, cycles=long_cycles)[0])
    e_star = float64_energy(long(params), graph)
    row = dict(model=name, params_m=sum(x.size for x in jax.tree.leaves(params)) / 1e6,
               e_start=float64_energy(params, graph), e_star=e_star)
    if is_chain:
      e_ref = numpy_chain_optimum(params, long_cycles)
      row["e_star_numpy_rel_diff"] = abs(e_ref - e_star) / e_ref
    for schedule in ("sequential", "parallel"):
      cycles = cycles_to_gap(params, graph, schedule, e_star, args.gap, args.max_cycles)
      row[f"cycles_{schedule}"] = cycles
      if cycles is not None:
        run = jax.jit(lambda p, g=graph, s=schedule, n=cycles:
                      enorm_jax.balance(p, g, cycles=n, schedule=s)[0], donate_argnums=0)
        row[f"ms_{schedule}"], _ = _common.median_ms(run, jax.tree.map(jnp.copy, params), reps)
    records.append(row)
  _common.emit(records, ["model", "params_m", "cycles_sequential", "ms_sequential",
                         "cycles_parallel", "ms_parallel", "e_star_numpy_rel_diff"], args.json)


if __name__ == "__main__":
  main()
