r"""One ENorm cycle vs. the memory floor (read + write every parameter once).

    python -m benchmarks.cycle [--quick] [--json PATH]

``ratio = cycle_ms / floor_ms``: both are medians of jitted, donated calls,
timed in alternation (one call of each per round) in this process.
``norms_ms`` times only the two per-unit reductions of every kernel (over its
inputs and over its outputs), unweighted and with nothing written back;
``norms_ratio = norms_ms / floor_ms``. In a cycle the second reduction of a
kernel needs factors computed from the first, so the two are never one fused
loop; an optimization barrier keeps XLA from fusing them here too (a fused
multi-output reduction of both axes is 2-4x slower on XLA:CPU, and made this
column read 2.5 on FC-15 and 4.1 on ResNet-50 before the barrier).

``two_pass_ms`` times the simplest program with a global version of a
cycle's data dependency: read every weight down to one scalar (by the fastest
reads we know on XLA:CPU: slice additions over conv taps, then a
matrix-vector product), then write every weight scaled by that scalar. A
weight's factors need the norms of its own kernel and, through the chain of
groups, of the kernels before it, so a kernel that is not still in cache is
read again to be written. ``two_pass_ratio`` estimates the lowest ``ratio``
reachable here. A dense kernel is read twice more than that (its per-input and
per-output sums need different factors, which depend on each other), a conv
kernel's second read is of its 9x smaller tap sums.

``read_ratio`` times one reduction of every kernel (its per-unit sums of w^2
over its last axis, nothing written): what one read-only pass over the weights
costs here, as a fraction of the floor. ``weighted_read_ratio`` times the
same reduction with every w^2 weighted by a factor along the reduced axis, as
a cycle weights a kernel's second reduction. On XLA:CPU with YNNPACK an
unweighted sum of squares is one fused reduction kernel, while any weighted
one (every formulation we tried) multiplies first and costs about twice as
much. The column is about dense kernels: for a conv kernel, a cycle's second
reduction is of its 9x smaller tap sums.

``dependent_reads_ratio`` times `read_twice_then_write`: the two-pass
reference plus a second read, after the first has finished, of every dense or
1x1-conv kernel that is both a producer and a consumer (a cycle reads such a
kernel over its outputs and then, with factors that depend on that read, over
its inputs). It is a reference, not a lower bound: a cycle may do the second
read of a kernel while it is still in cache, which this program, with all
first reads before all second reads, cannot.

``unit_write_ratio`` times the same program with a cycle's write pattern as
well (``read_twice_then_write(..., per_unit=True)``): every weight is written
times per-unit vectors along its unit axes (output axis for producers, input
axis for consumers, both for a kernel between two groups), made from the
reads, by plain multiplication. A cycle's write also divides correctly
rounded, and its factors come from many small dependent group updates; this
column leaves both out.

``--profile`` adds the parts of a sequential cycle, as fractions of the floor:
``factors_ratio`` (one cycle's factors, nothing written: the pass over every
weight plus the group updates), ``extra_cycle_ratio`` (one more cycle of group
updates, which reads only the tap sums and the dense kernels) and
``write_ratio`` (writing given factors with `rescale`).

In alternation each call starts with the other steps' arrays in cache, as in a
training step; ``--warm`` times each step in its own loop instead, where models
that fit in the last-level cache make the floor much cheaper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import enorm_jax
from benchmarks import _common
from benchmarks.resnet50 import ResNet50


# Factors are 1 + _NUDGE * (sums of the reads): 1.0 in value, but XLA cannot
# know that, so the write waits for the reads.
_NUDGE = 1e-30


def _sum_taps(rows):
  """Sums the leading axis of ``rows`` (at most 64 conv taps) by slice additions."""
  return sum(rows[i] for i in range(len(rows)))


def _rows_sum(rows):
  """Sums the last axis of 2-D ``rows`` by a matrix-vector product with ones.

  On XLA:CPU (jax 0.10) this fuses the operand and reads ``rows`` once; a
  reduction of a long last axis, or a vector-matrix product, writes its operand
  first and reads it again (several times slower).
  """
  ones = jnp.ones((rows.shape[-1],), rows.dtype)
  return jnp.dot(rows, ones, precision=jax.lax.Precision.HIGHEST)


def _is_matrix(w) -> bool:
  """A dense or 1x1-conv kernel: nothing but its input and output axes."""
  return w.ndim >= 2 and w.size == w.shape[-2] * w.shape[-1]


def unit_norms(params):
  """Per-unit sums of w^2 of every kernel over its inputs and over its outputs.

  These are the two reductions an exact cycle needs at least once per weight,
  written as `balance` writes them (a conv's taps summed by slice additions
  first; sums over the last axis as matrix-vector products with ones, sums over
  the input axis as reductions), but
  unweighted and with no write-back. A barrier orders a dense kernel's two
  reductions, as a cycle's factors do, so XLA cannot fuse them into one loop.
  """
  sums = []
  for w in jax.tree.leaves(params):
    if w.ndim < 2:
      continue
    if _is_matrix(w):
      w = w.reshape(w.shape[-2:])
      over_inputs = jnp.sum(w * w, axis=0)
      w, over_inputs = jax.lax.optimization_barrier((w, over_inputs))
      sums += [over_inputs, _rows_sum(w * w)]
    else:
      stat = _sum_taps((w * w).reshape(-1, *w.shape[-2:]))
      sums += [jnp.sum(stat, axis=0), _rows_sum(stat)]
  return sums


def last_axis_norms(params, weighted: bool = False):
  """Sums of w^2 over the last axis of every kernel: one read, nothing written.

  With ``weighted``, w^2 is weighted by a factor vector along that axis
  (``linspace(0.5, 1.5)``), as a cycle weights a kernel's second reduction.
  """
  def norms(w):
    sq = w * w
    if weighted:
      sq = sq * jnp.linspace(0.5, 1.5, w.shape[-1], dtype=w.dtype)
    return _rows_sum(sq.reshape(-1, w.shape[-1])).reshape(w.shape[:-1])
  return [norms(w) for w in jax.tree.leaves(params) if w.ndim >= 2]


def _fast_read(w):
  """A scalar that depends on every element of ``w``, by XLA:CPU's fastest reads.

  Leading axes of at most 64 elements (conv taps) are summed by slice
  additions, then one matrix-vector product with ones reads the rest.
  """
  if w.ndim < 2:
    return jnp.sum(w)
  rows = w.reshape(-1, *w.shape[-2:])
  if 1 < len(rows) <= 64:
    rows = _sum_taps(rows)[None]
  return jnp.sum(_rows_sum(rows.reshape(-1, w.shape[-1])))


def read_then_write(params):
  """Reads every weight into one scalar, then writes every weight scaled by it."""
  total = sum(_fast_read(w) for w in jax.tree.leaves(params))
  scale = 1.0 + _NUDGE * total
  return jax.tree.map(lambda w: w * scale.astype(w.dtype), params)


def role_paths(graph, role: str) -> set[str]:
  """The paths of every entry in ``role`` (a `Group` field) of any group."""
  return {e.path for g in graph.groups for e in getattr(g, role)}


def read_twice_then_write(params, graph, per_unit: bool = False):
  """`read_then_write` with a second read of every kernel that needs one.

  A dense or 1x1-conv kernel that is both a producer and a consumer has
  per-output sums for one group and per-input sums for another, and the second
  depends on factors computed from the first (whatever the order). This reads
  such kernels over their outputs, folds every read into one scalar, then reads
  them again over their inputs, weighted by a vector made from that scalar, and
  only then writes every weight. Conv kernels with taps are read once, as
  `balance` reads them (the cycles work on their 9x smaller tap sums).

  With ``per_unit``, the write scales each weight along its unit axes, as a
  cycle writes it: producers (and 1-D leaves) times a vector along the last
  axis, consumers times a vector along the input axis (a kernel with both roles
  takes both), by plain multiplication (no correctly rounded division).
  Otherwise every weight is multiplied by one scalar.
  """
  producers, consumers = role_paths(graph, "producers"), role_paths(graph, "consumers")
  twice = producers & consumers
  leaves = enorm_jax.leaves_by_path(params)
  first = sum(_fast_read(w) for w in leaves.values())
  second = 0.0
  for path, w in leaves.items():
    if path in twice and _is_matrix(w):
      w = w.reshape(w.shape[-2:])
      weights = 1.0 + _NUDGE * first * jnp.arange(w.shape[0], dtype=w.dtype)
      second = second + jnp.sum(_rows_sum((w / weights[:, None]) ** 2))
  total = first + second

  def unit_factors(n, dtype):
    return 1.0 + (_NUDGE * total).astype(dtype) * jnp.arange(n, dtype=dtype)

  def write(path, w):
    if not per_unit:
      return w * (1.0 + _NUDGE * total).astype(w.dtype)
    if w.ndim < 2 or path in producers:
      w = w * unit_factors(w.shape[-1], w.dtype)
    if w.ndim >= 2 and path in consumers:
      w = w * unit_factors(w.shape[-2], w.dtype)[:, None]
    return w

  paths = iter(enorm_jax.leaves_by_path(params))
  return jax.tree.map(lambda w: write(next(paths), w), params)


def _read_only(fn, params):
  """A (step, state) pair that runs jitted ``fn`` on ``params`` and keeps them."""
  jitted = jax.jit(fn)
  return (lambda p: (jax.block_until_ready(jitted(p)), p)[1]), jax.tree.map(jnp.copy, params)


def _profile_steps(params, graph):
  """The parts of a sequential cycle: factors after 1 and 11 cycles, and the write."""
  steps = {f"factors_{n}": _read_only(lambda p, n=n: enorm_jax.balance(p, graph, cycles=n)[1],
                                      params) for n in (1, 11)}
  _, scales = jax.jit(lambda p: enorm_jax.balance(p, graph))(params)
  steps["write"] = (jax.jit(lambda p: enorm_jax.rescale(p, scales, graph), donate_argnums=0),
                    jax.tree.map(jnp.copy, params))
  return steps


def models(quick: bool):
  """(name, params, graph): the paper's models, then a traced ResNet-50 (eval BN)."""
  for name, model, shape in _common.paper_models(quick):
    params = _common.init_params(model, shape)
    yield name, params, model.rescaling_graph(params)
  if not quick:
    model, x = ResNet50(), jnp.ones((1, 224, 224, 3))
    variables = model.init(jax.random.key(0), x)
    yield "ResNet-50 (traced)", variables, enorm_jax.trace_graph(
        lambda v, x: model.apply(v, x), variables, x)


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--warm", action="store_true",
                      help="time each step in its own loop (weights stay in cache) "
                           "instead of in alternation")
  parser.add_argument("--profile", action="store_true",
                      help="also time the parts of a sequential cycle: the factors alone "
                           "(norms and group updates), one more group-update cycle, and "
                           "the write of given factors (`rescale`)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="parameter dtype (norms always accumulate in float32)")
  args = parser.parse_args()
  reps = 5 if args.quick else 30
  records = []
  for name, params, graph in models(args.quick):
    params = jax.tree.map(lambda w: w.astype(args.dtype), params)
    n = sum(x.size for x in jax.tree.leaves(params))
    floor = jax.jit(lambda p: jax.tree.map(lambda w: w * 1.0001, p), donate_argnums=0)
    steps = {"floor": (floor, params)}
    for schedule in ("sequential", "parallel"):
      cycle = jax.jit(lambda p, s=schedule, g=graph: enorm_jax.balance(p, g, schedule=s)[0],
                      donate_argnums=0)
      steps[schedule] = (cycle, jax.tree.map(jnp.copy, params))
    steps["two_pass"] = (jax.jit(read_then_write, donate_argnums=0),
                         jax.tree.map(jnp.copy, params))
    steps["dependent_reads"] = (jax.jit(lambda p, g=graph: read_twice_then_write(p, g),
                                        donate_argnums=0), jax.tree.map(jnp.copy, params))
    steps["unit_write"] = (jax.jit(lambda p, g=graph: read_twice_then_write(p, g, True),
                                   donate_argnums=0), jax.tree.map(jnp.copy, params))
    steps["norms"] = _read_only(unit_norms, params)
    steps["read"] = _read_only(last_axis_norms, params)
    steps["weighted_read"] = _read_only(lambda p: last_axis_norms(p, weighted=True), params)
    if args.profile:
      steps.update(_profile_steps(params, graph))
    if args.warm:
      ms = {k: _common.median_ms(step, state, reps)[0] for k, (step, state) in steps.items()}
    else:
      ms = _common.interleaved_ms(steps, reps)
    row = dict(model=name, params_m=n / 1e6, floor_ms=ms["floor"],
               cycle_ms_sequential=ms["sequential"], cycle_ms_parallel=ms["parallel"])
    row["cycle_ms"] = min(row["cycle_ms_sequential"], row["cycle_ms_parallel"])
    row["ratio"] = row["cycle_ms"] / row["floor_ms"]
    row["two_pass_ms"] = ms["two_pass"]
    row["two_pass_ratio"] = ms["two_pass"] / ms["floor"]
    row["dependent_reads_ratio"] = ms["dependent_reads"] / ms["floor"]
    row["unit_write_ratio"] = ms["unit_write"] / ms["floor"]
    row["norms_ms"] = ms["norms"]
    row["norms_ratio"] = ms["norms"] / ms["floor"]
    row["read_ratio"] = ms["read"] / ms["floor"]
    row["weighted_read_ratio"] = ms["weighted_read"] / ms["floor"]
    if args.profile:
      row["factors_ratio"] = ms["factors_1"] / ms["floor"]
      row["extra_cycle_ratio"] = (ms["factors_11"] - ms["factors_1"]) / 10 / ms["floor"]
      row["write_ratio"] = ms["write"] / ms["floor"]
    records.append(row)
  _common.emit(records, ["model", "params_m", "floor_ms", "cycle_ms_sequential",
                         "cycle_ms_parallel", "ratio", "two_pass_ratio", "dependent_reads_ratio",
                         "unit_write_ratio",
                         "norms_ratio", "read_ratio", "weighted_read_ratio"]
               + (["factors_ratio", "extra_cycle_ratio", "write_ratio"] if args.profile else []),
               args.json)


if __name__ == "__main__":
  main()
