r"""The paper's Appendix A demonstration: balancing a deliberately unbalanced network.

A 20-layer ReLU network of 500 x 500 Xavier matrices, with layer 6 multiplied by
1.2 and layer 12 by 0.8, is balanced cycle by cycle. For each cycle this prints
the energy, its relative change, and the relative error of the network's output
on random inputs (ENorm must not change the function).

    python -m experiments.appendix_a --cycles 100 \
        --json experiments/results/appendix_a.json --plot experiments/results/appendix_a.png
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import enorm_jax
from experiments.common import reports

_CYCLES = flags.DEFINE_integer("cycles", 100, "ENorm cycles to run.")
_LAYERS = flags.DEFINE_integer("layers", 20, "Number of layers.")
_WIDTH = flags.DEFINE_integer("width", 500, "Width of every layer.")
_SCHEDULE = flags.DEFINE_enum("schedule", "sequential", ["sequential", "parallel"],
                              "Group update order.")
_JSON = flags.DEFINE_string("json", None, "Write per-cycle records to this JSON file.")
_PLOT = flags.DEFINE_string("plot", None, "Write Figures 6-7 style plot to this PNG.")


def unbalanced_network(layers: int = 20, width: int = 500, seed: int = 0):
  """Xavier-uniform square layers; layer 6 is scaled by 1.2 and layer 12 by 0.8 (1-based)."""
  init = jax.nn.initializers.glorot_uniform()
  keys = jax.random.split(jax.random.key(seed), layers)
  params = {}
  for k in range(layers):
    w = init(keys[k], (width, width), jnp.float32)
    w = w * {5: 1.2, 11: 0.8}.get(k, 1.0)
    params[f"Dense_{k}"] = {"kernel": w}
  return params


def apply(params, x):
  n = len(params)
  for k in range(n):
    x = x @ params[f"Dense_{k}"]["kernel"]
    if k < n - 1:
      x = jax.nn.relu(x)
  return x


def column_energies(params):
  """Per-layer vector of squared column norms (the quantities ENorm equalizes)."""
  return [jnp.sum(params[f"Dense_{k}"]["kernel"] ** 2, axis=0) for k in range(len(params))]


def run(cycles: int, layers: int, width: int, schedule: str):
  params = unbalanced_network(layers, width)
  graph = enorm_jax.chain_graph(params, [f"Dense_{k}" for k in range(layers)])
  x = jax.random.normal(jax.random.key(1), (64, width))
  y = apply(params, x)
  step = jax.jit(lambda p: enorm_jax.balance(p, graph, schedule=schedule)[0], donate_argnums=0)
  energy = jax.jit(lambda p: enorm_jax.energy(p, graph))
  error = jax.jit(lambda p: jnp.max(jnp.abs(apply(p, x) - y)) / jnp.max(jnp.abs(y)))
  records = [dict(cycle=0, energy=float(energy(params)), rel_change=None,
                  function_error=0.0)]
  snapshots = {0: [jax.device_get(e) for e in column_energies(params)]}
  previous = records[0]["energy"]
  start = time.perf_counter()
  for cycle in range(1, cycles + 1):
    params = step(params)
    e = float(energy(params))
    records.append(dict(cycle=cycle, energy=e, rel_change=abs(previous - e) / previous,
                        function_error=float(error(params))))
    previous = e
    if cycle in (1, 5, 50, cycles):
      snapshots[cycle] = [jax.device_get(v) for v in column_energies(params)]
  elapsed = time.perf_counter() - start
  return records, snapshots, elapsed


def plot(records, snapshots, path):
  plt = reports.pyplot()
  import numpy as np
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for cycle, energies in sorted(snapshots.items()):
    per_layer = [float(np.mean(e)) for e in energies]
    left.plot(range(1, len(per_layer) + 1), per_layer, marker="o", label=f"cycle {cycle}")
  left.set(xlabel="layer", ylabel="mean squared column norm", yscale="log",
           title="Per-layer energy (cf. Fig. 6)")
  left.legend()
  final = records[-1]["energy"]
  right.semilogy([r["cycle"] for r in records],
                 [max(r["energy"] - final, 1e-12) / final for r in records])
  right.set(xlabel="ENorm cycle", ylabel="(E - E_final) / E_final",
            title="Convergence of the energy (cf. Fig. 7)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  records, snapshots, elapsed = run(_CYCLES.value, _LAYERS.value, _WIDTH.value,
                                    _SCHEDULE.value)
  print(f"{'cycle':>5} {'energy':>14} {'rel. change':>12} {'function error':>15}")
  for r in records:
    change = "" if r["rel_change"] is None else f"{r['rel_change']:.3e}"
    print(f"{r['cycle']:>5} {r['energy']:>14.6f} {change:>12} {r['function_error']:>15.2e}")
  reached = next((r["cycle"] for r in records[1:] if r["rel_change"] < 1e-6), None)
  print(f"\n{_CYCLES.value} cycles in {elapsed:.2f} s; relative change < 1e-6 first at cycle "
        f"{reached}; max function error {max(r['function_error'] for r in records):.2e}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(records, f, indent=1)
  if _PLOT.value:
    plot(records, snapshots, _PLOT.value)


if __name__ == "__main__":
  app.run(main)
