r"""Where one ENorm cycle's time goes: XLA operation times from a profiler trace.

    python -m benchmarks.breakdown [--quick] [--json PATH] [--steps]

For each model this traces ``reps`` donated calls of the floor (every weight
read and written once, as in `benchmarks.cycle`) and of one sequential cycle
with `jax.profiler`, and adds up the time the runtime spent in each XLA
operation of the compiled program. Operations are grouped by kind: their HLO
name without its numeric suffix. Each kind also reports how many elements its
operations write (``out_m``, millions), which tells the passes apart:

* a reduction of kernels to per-unit sums writes little (on XLA:CPU these are
  ``ynn_fusion``: YNNPACK reductions);
* the conv tap sums write a ninth of what they read;
* the write of the new weights writes every weight (for a kernel between two
  groups, a multiply by the output factors and a correctly rounded division by
  the input factors);
* ``dot`` are the matrix-vector products that contract the tap sums with
  factor vectors.

Times are thread times in ms per call, summed over the operations: the two
cores can run two operations at once, so a sum can exceed the wall time. They
are compared with ``floor_ms``, the same sum for the floor. A conditional's
time includes the operations of the branch it ran (a cycle's log-space
fallback). The kind names are XLA's and may change between versions.

With ``--steps`` it profiles training steps instead: the plain step and the
``enorm`` step of `benchmarks.step` (``calls`` steps each, 3 with
``--quick``, on the same weights), and reports both steps' thread time,
the kinds that take the most in either, and ``enorm_only_ms``, the time of
the kinds of operation that only the ENorm step has. ENorm's other work is in
kinds both steps have (e.g. YNNPACK reductions, which also run the
convolutions), so ``enorm_only_ms`` is a part of its cost, not all of it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import re
import tempfile

import jax
import jax.numpy as jnp

import enorm_jax
from benchmarks import _common

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^)]*\)|\w+\[[\d,]*\])")
_DIMS = re.compile(r"\[([\d,]*)\]")


def output_sizes(compiled_text: str) -> dict[str, int]:
  """Elements written by every instruction of a compiled HLO module (all tuple parts)."""
  sizes = {}
  for line in compiled_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      sizes[m.group(1)] = sum(math.prod(int(d) for d in dims.split(",") if d)
                              for dims in _DIMS.findall(m.group(2)))
  return sizes


def kind(name: str) -> str:
  """An HLO instruction name without its numeric suffix (``dot.62`` -> ``dot``)."""
  return re.sub(r"\.\d+$", "", name)


def thread_ms_by_kind(events: list[dict], sizes: dict[str, int], calls: int
                      ) -> dict[str, dict[str, float]]:
  """Per-call thread ms and output elements (millions) of each kind of operation.

  ``events`` are Chrome trace events; only complete events ('X') named after
  an instruction in ``sizes`` count.
  """
  parts = collections.defaultdict(lambda: {"ms": 0.0, "out_m": 0.0})
  seen = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("name") not in sizes:
      continue
    part = parts[kind(e["name"])]
    part["ms"] += e["dur"] / 1e3 / calls
    seen[e["name"]] += 1
  for name, count in seen.items():
    parts[kind(name)]["out_m"] += sizes[name] / 1e6 * (count / calls)
  return dict(parts)


def _trace(step, state, calls: int) -> list[dict]:
  for _ in range(2):
    state = jax.block_until_ready(step(state))
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(calls):
      state = jax.block_until_ready(step(state))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      return json.load(f)["traceEvents"]


def _profile_jitted(jitted, state, calls: int) -> dict[str, dict[str, float]]:
  """Per-kind thread ms of ``state = jitted(state)``, compiled once."""
  compiled = jitted.lower(state).compile()
  return thread_ms_by_kind(_trace(compiled, state, calls), output_sizes(compiled.as_text()),
                           calls)


def profile(fn, params, calls: int) -> dict[str, dict[str, float]]:
  """Per-kind thread ms of jitted, donated ``fn`` on a copy of ``params``."""
  return _profile_jitted(jax.jit(fn, donate_argnums=0), jax.tree.map(jnp.copy, params), calls)


def step_record(name: str, make, shape, calls: int) -> dict:
  """Per-kind thread ms of the plain and the ENorm training step of one model."""
  from benchmarks import step as step_bench
  x, y = step_bench.inputs(shape)
  parts = {variant: _profile_jitted(*step_bench.variant_step(make, x, y, variant), calls)
           for variant in ("plain", "enorm")}
  totals = {v: sum(part["ms"] for part in parts[v].values()) for v in parts}
  kinds = sorted(set(parts["plain"]) | set(parts["enorm"]),
                 key=lambda k: -max(parts[v].get(k, {"ms": 0.0})["ms"] for v in parts))
  ms = {v: {k: parts[v].get(k, {"ms": 0.0})["ms"] for k in kinds} for v in parts}
  return dict(model=name, plain_thread_ms=totals["plain"], enorm_thread_ms=totals["enorm"],
              enorm_only_ms=sum(ms["enorm"][k] for k in kinds if k not in parts["plain"]),
              parts=ms,
              top=", ".join(f"{k} {ms['plain'][k]:.0f}/{ms['enorm'][k]:.0f}"
                            for k in kinds[:4]))


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--steps", action="store_true",
                      help="profile the plain and the ENorm training step instead of a cycle")
  args = parser.parse_args()
  if args.steps:
    from benchmarks.step import CONFIGS
    configs = CONFIGS[:2] if args.quick else CONFIGS
    records = [step_record(name, make, shape, 3 if args.quick else 5)
               for name, make, shape, _ in configs]
    _common.emit(records, ["model", "plain_thread_ms", "enorm_thread_ms", "enorm_only_ms",
                           "top"], args.json)
    return
  calls = 5 if args.quick else 20
  records = []
  for name, model, shape in _common.paper_models(args.quick):
    params = _common.init_params(model, shape)
    graph = model.rescaling_graph(params)
    floor = profile(lambda p: jax.tree.map(lambda w: w * 1.0001, p), params, calls)
    cycle = profile(lambda p, g=graph: enorm_jax.balance(p, g)[0], params, calls)
    floor_ms = sum(part["ms"] for part in floor.values())
    cycle_ms = sum(part["ms"] for part in cycle.values())
    top = sorted(cycle.items(), key=lambda kv: -kv[1]["ms"])
    records.append(dict(
        model=name, floor_ms=floor_ms, cycle_ms=cycle_ms, ratio=cycle_ms / floor_ms,
        parts={k: dict(v, floors=v["ms"] / floor_ms) for k, v in top},
        top=", ".join(f"{k} {v['ms'] / floor_ms:.2f} ({v['out_m']:.2g}M out)"
                      for k, v in top[:4])))
  _common.emit(records, ["model", "floor_ms", "cycle_ms", "ratio", "top"], args.json)


if __name__ == "__main__":
  main()
