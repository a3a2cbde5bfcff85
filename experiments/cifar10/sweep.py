r"""Resumable sweeps of the paper's CIFAR-10 experiments.

Every finished cell appends one record to the results JSON; a rerun skips the
cells already there (and resumes a half-finished cell from its checkpoint).

    python -m experiments.cifar10.sweep --sweep=fc --data_dir=../shared/data/cifar10  # by block
    python -m experiments.cifar10.sweep --sweep=fc_search   # only the shortened LR search
    python -m experiments.cifar10.sweep --sweep=fc_final    # only the 60-epoch runs
    python -m experiments.cifar10.sweep --sweep=conv_reduced
    python -m experiments.cifar10.sweep --sweep=conv_no_bias  # bias check, a few cells
    python -m experiments.cifar10.sweep --sweep=conv_table2   # Table 2, searched, 3 seeds

Several processes may run the same sweep at once (one per core with `taskset`);
see `experiments.common.sweeps`.

The FC learning-rate search is SHORTENED: each rate of `SEARCH_LRS` (Path-SGD:
`PATH_SGD_LRS`) is trained for `SEARCH_EPOCHS` epochs (same schedule shape,
compressed), and the best validation accuracy per (method, c, depth) picks the
rate of the 60-epoch runs, which then run with every seed of the block. GN
searches its group counts: the full grid at depth 3, then a coordinate search.
Where the search chose a rate the other methods did not (`FC_RATE_CHECKS`), its
second-best rate also runs 60 epochs, into ``cifar10_fc_rate_check.json``.
ENorm-Impl searches its regularizer weight with the rate at `IMPL_SEARCH_DEPTHS`.

The Table 2 sweep (`configs/conv_table2.py`) searches each method's rate with
short runs into ``cifar10_conv_table2_search.json``, then runs every seed at the
chosen rate into ``cifar10_conv_table2.json``.

Each record keeps its run's per-epoch curve (`epoch_curve`). Records from before
the curve was recorded get it from their run's workdir, where it is still there:

    python -m experiments.cifar10.sweep --sweep=conv_table2 --add_curves
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging

from experiments.cifar10 import train
from experiments.cifar10.configs import conv, conv_reduced, conv_table2, fc
from experiments.common import sweeps
from experiments.common.trainer import NonFiniteLossError

_SWEEP = flags.DEFINE_enum("sweep", "fc", ["fc", "fc_search", "fc_final", "conv_reduced",
                                           "conv_no_bias", "conv_table2"],
                           "Which sweep; 'fc' interleaves search and final runs by block.")
_ADD_CURVES = flags.DEFINE_bool("add_curves", False, "Only add the per-epoch curve, read "
                                "from the run's workdir, to the sweep's records without one.")

SEARCH_EPOCHS = 5
# (method, c) pairs; ENorm with c = 1 and 1.2.
FC_MAIN = [("baseline", 1.0), ("enorm", 1.0), ("enorm", 1.2), ("bn", 1.0)]
FC_EXTRA = [("gn", 1.0), ("path_sgd", 1.0), ("enorm_impl", 1.0)]
# The top three rates of the paper's grid: in the full-grid search of the nets with
# biases (cifar10_fc_search_bias.json) every best rate was >= 0.01, Path-SGD's at 0.01.
SEARCH_LRS = (0.01, 0.05, 0.1)
PATH_SGD_LRS = (0.005, 0.01, 0.05)
# Blocks in priority order: (depths, (method, c) pairs, seeds of the 60-epoch runs).
FC_BLOCKS = (((15, 3), FC_MAIN, fc.SEEDS),
             ((10, 19), FC_MAIN, fc.SEEDS),
             ((1, 5), FC_MAIN, (0,)),
             ((1,), FC_MAIN, fc.SEEDS),  # depth 1: methods within a seed's spread
             ((3, 15), FC_EXTRA, fc.SEEDS))
# ENorm-Impl's regularizer weight, searched with the rate at these depths (elsewhere
# the config's default).
IMPL_LAMBDAS = (1e-4, 1e-3, 1e-2)
IMPL_SEARCH_DEPTHS = (15,)
# 60-epoch runs at the search's second-best rate, where the 5-epoch search chose a
# rate the other methods did not: (depth, (method, c) pairs), every seed.
FC_RATE_CHECKS = ((1, [("enorm", 1.0), ("enorm", 1.2)]),)
GN_FULL_GRID_DEPTH = 3
CONV_METHODS = [("baseline", 1.0), ("bn", 1.0), ("gn", 1.0), ("enorm", 1.0), ("enorm", 1.2)]
CONV_BATCH_SIZES = (8, 32, 128)
CONV_LR = 0.05
# Momentum 0.9 makes the effective step 10x larger: its cells also run at 0.01.
CONV_MOMENTUM_LR = 0.01
CONV_GN_GROUPS = 32  # until the search below picks one
CONV_GN_SEARCH = (32, 0.0)  # (batch size, momentum) of the GN group search
# Conv cells rerun without biases: (batch size, momentum, lr), for the methods below.
CONV_NO_BIAS_SETTINGS = ((32, 0.0, 0.05), (8, 0.9, 0.05))
CONV_NO_BIAS_METHODS = [("baseline", 1.0), ("enorm", 1.0), ("enorm", 1.2)]
KEY_FIELDS = ("method", "c", "depth", "batch_size", "momentum", "lr", "epochs", "seed",
              "gn_groups", "width_multiplier", "use_bias", "impl_lambda")


def cell_key(record) -> tuple:
  return tuple(record.get(k) for k in KEY_FIELDS)


def cell_name(cell) -> str:
  return "_".join(f"{k}={cell[k]}" for k in KEY_FIELDS if cell.get(k) is not None)


def _key3(record):
  return record["method"], record["c"], record["depth"]


def _best(records):
  done = [r for r in records if r["val_acc"] is not None]
  return max(done, key=lambda r: r["val_acc"]) if done else None


def _search_cells(method, c, depth, search):
  """Search cells of one (method, c, depth); GN cells depend on earlier results."""
  lrs = PATH_SGD_LRS if method == "path_sgd" else SEARCH_LRS

  def cell(lr, groups=None):
    return dict(method=method, c=c, depth=depth, lr=lr, epochs=SEARCH_EPOCHS,
                gn_groups=groups)
  if method == "enorm_impl":
    lambdas = IMPL_LAMBDAS if depth in IMPL_SEARCH_DEPTHS else (fc.get_config().impl_lambda,)
    return [dict(cell(lr), impl_lambda=lam) for lam in lambdas for lr in lrs]
  if method != "gn":
    return [cell(lr) for lr in lrs]
  if depth == GN_FULL_GRID_DEPTH:
    return [cell(lr, g) for g in fc.GN_GROUPS for lr in lrs]
  # Coordinate search: the LR grid at the group count chosen at depth 3, then the
  # other group counts at the LR chosen there.
  chosen = _best([r for r in search if _key3(r) == (method, c, GN_FULL_GRID_DEPTH)])
  if chosen is None:
    return [cell(lr, 10) for lr in lrs]  # provisional until depth 3 is searched
  groups = chosen["gn_groups"]
  cells = [cell(lr, groups) for lr in lrs]
  best_lr = _best([r for r in search if _key3(r) == (method, c, depth)
                   and r["gn_groups"] == groups])
  if best_lr is not None:
    cells += [cell(best_lr["lr"], g) for g in fc.GN_GROUPS if g != groups]
  return cells


def fc_cells(stage, results_dir):
  """Cells of `stage` ('search', 'final' or 'all'), in priority order.

  Blocks run in `FC_BLOCKS` order. Within a block, the search comes first, then
  the 60-epoch runs of seed 0, then the other seeds; a triple's 60-epoch runs
  wait until its search is complete, so a partial sweep already has final numbers
  for the first block.
  """
  search = sweeps.read_results(os.path.join(results_dir, "cifar10_fc_search.json"))
  done = {_search_key(r) for r in search}
  cells = []
  for depths, pairs, seeds in FC_BLOCKS:
    triples = [(m, c, d) for d in depths for m, c in pairs]
    block_search = {t: _search_cells(*t, search) for t in triples}
    if stage in ("search", "all"):
      cells += [x for t in triples for x in block_search[t]]
    if stage in ("final", "all"):
      for seed in seeds:
        for t in triples:
          best = _best([r for r in search if _key3(r) == t])
          if best is None or any(_search_key(x) not in done for x in block_search[t]):
            continue  # its search is not finished yet
          cells.append(dict(method=t[0], c=t[1], depth=t[2], lr=best["lr"], epochs=60,
                            gn_groups=best.get("gn_groups"), seed=seed, stage="final",
                            impl_lambda=best.get("impl_lambda")))
  if stage in ("final", "all"):
    cells += _rate_check_cells(search)
  unique = {cell_name(x): x for x in reversed(cells)}  # blocks may share a triple
  return list(reversed(unique.values()))


def _rate_check_cells(search):
  cells = []
  for depth, pairs in FC_RATE_CHECKS:
    for method, c in pairs:
      runs = [r for r in search if _key3(r) == (method, c, depth)]
      finished = sorted((r for r in runs if r["val_acc"] is not None),
                        key=lambda r: -r["val_acc"])
      if len(runs) < len(SEARCH_LRS) or len(finished) < 2:
        continue  # its search is not finished, or no second rate trained
      cells += [dict(method=method, c=c, depth=depth, lr=finished[1]["lr"], epochs=60, seed=s,
                     stage="rate_check") for s in fc.SEEDS]
  return cells


def _search_key(record):
  return cell_key(dict(record, batch_size=None, momentum=None, seed=None, use_bias=None))


def conv_cells(results_dir):
  """Reduced-protocol cells in priority order (some depend on earlier results).

  1. Every method at each batch size and momentum at `CONV_LR`, GN with
     `CONV_GN_GROUPS` groups, the fastest (largest) batches first.
  2. GN's group count searched over the paper's grid at batch 32 without momentum.
  3. If another count wins there, GN's other cells of step 1 again with it.
  4. Momentum 0.9 again at `CONV_MOMENTUM_LR` (the paper grid's smallest rate), GN
     with the chosen count (`CONV_GN_GROUPS` until the search is done).
  """
  config = conv_reduced.get_config()

  def cell(method, c, batch_size, momentum, lr, groups=CONV_GN_GROUPS):
    return dict(method=method, c=c, batch_size=batch_size, momentum=momentum, lr=lr,
                epochs=config.num_epochs, gn_groups=groups if method == "gn" else None,
                width_multiplier=config.width_multiplier)
  batch_sizes = sorted(CONV_BATCH_SIZES, reverse=True)
  settings = [(b, mo) for b in batch_sizes for mo in conv.MOMENTUMS]
  cells = [cell(m, c, b, mo, CONV_LR) for b, mo in settings for m, c in CONV_METHODS]
  search = [cell("gn", 1.0, *CONV_GN_SEARCH, CONV_LR, g) for g in conv.GN_GROUPS]
  cells += [x for x in search if x["gn_groups"] != CONV_GN_GROUPS]
  done = sweeps.read_results(os.path.join(results_dir, "cifar10_conv.json"))
  search_keys = {cell_key(make_record("conv_reduced", dict(x, seed=0))) for x in search}
  found = [r for r in done if cell_key(r) in search_keys]
  chosen = _best(found) if len(found) == len(search) else None
  groups = chosen["gn_groups"] if chosen else CONV_GN_GROUPS
  if groups != CONV_GN_GROUPS:
    cells += [cell("gn", 1.0, b, mo, CONV_LR, groups) for b, mo in settings
              if (b, mo) != CONV_GN_SEARCH]
  cells += [cell(m, c, b, 0.9, CONV_MOMENTUM_LR, groups) for b in batch_sizes
            for m, c in CONV_METHODS]
  return cells


def conv_no_bias_cells():
  """`conv_cells` settings where ENorm's conv results were weakest, without biases."""
  config = conv_reduced.get_config()
  return [dict(method=m, c=c, batch_size=b, momentum=mo, lr=lr, epochs=config.num_epochs,
               gn_groups=None, width_multiplier=config.width_multiplier, use_bias=False)
          for b, mo, lr in CONV_NO_BIAS_SETTINGS for m, c in CONV_NO_BIAS_METHODS]


def conv_table2_cells(results_dir):
  """Table 2's cells in order: each method's rate search, then each seed's runs
  (seed 0 of every method first) at the rate its search chose."""
  config = conv_table2.get_config()

  def cell(method, c, lr, epochs, seed, stage):
    return dict(method=method, c=c, batch_size=config.batch_size, momentum=config.momentum,
                lr=lr, epochs=epochs, seed=seed, width_multiplier=config.width_multiplier,
                gn_groups=config.gn_groups if method == "gn" else None, stage=stage)
  search = sweeps.read_results(os.path.join(results_dir, "cifar10_conv_table2_search.json"))
  cells = [cell(m, c, lr, conv_table2.SEARCH_EPOCHS, 0, "search")
           for m, c in conv_table2.METHODS for lr in conv_table2.LEARNING_RATES]
  for seed in conv_table2.SEEDS:
    for m, c in conv_table2.METHODS:
      runs = [r for r in search if (r["method"], r["c"]) == (m, c)]
      best = _best(runs)
      if len(runs) == len(conv_table2.LEARNING_RATES) and best is not None:
        cells.append(cell(m, c, best["lr"], config.num_epochs, seed, "final"))
  return cells


_CONFIGS = {"conv_reduced": conv_reduced, "conv_no_bias": conv_reduced,
            "conv_table2": conv_table2}


def make_config(sweep, cell, data_dir):
  config = _CONFIGS.get(sweep, fc).get_config()
  config.data_dir = data_dir
  config.method, config.c = cell["method"], cell["c"]
  config.learning_rate, config.num_epochs = cell["lr"], cell["epochs"]
  config.seed = cell.get("seed", 0)
  if cell.get("depth") is not None:
    config.depth = cell["depth"]
  if cell.get("batch_size") is not None:
    config.batch_size = cell["batch_size"]
  if cell.get("momentum") is not None:
    config.momentum = cell["momentum"]
  if cell.get("gn_groups") is not None:
    config.gn_groups = cell["gn_groups"]
  if cell.get("use_bias") is not None:
    config.use_bias = cell["use_bias"]
  if cell.get("impl_lambda") is not None:
    config.impl_lambda = cell["impl_lambda"]
  if config.method == "path_sgd":
    config.weight_decay = 0.0
  return config


RESULT_FILES = {
    "conv_reduced": {None: "cifar10_conv.json"}, "conv_no_bias": {None: "cifar10_conv.json"},
    "conv_table2": {"search": "cifar10_conv_table2_search.json",
                    "final": "cifar10_conv_table2.json"},
    **{sweep: {"final": "cifar10_fc.json", "rate_check": "cifar10_fc_rate_check.json",
               None: "cifar10_fc_search.json"}
       for sweep in ("fc", "fc_search", "fc_final")}}


def pending_cells(sweep, results_dir):
  """(cell, results path) pairs still to run, recomputed as results come in."""
  if sweep == "conv_reduced":
    cells = conv_cells(results_dir)
  elif sweep == "conv_no_bias":
    cells = conv_no_bias_cells()
  elif sweep == "conv_table2":
    cells = conv_table2_cells(results_dir)
  else:
    cells = fc_cells("all" if sweep == "fc" else sweep.split("_")[1], results_dir)
  tagged = [(c, RESULT_FILES[sweep][c.pop("stage", None)]) for c in cells]
  todo = []
  for cell, name in tagged:
    cell.setdefault("seed", 0)
    path = os.path.join(results_dir, name)
    done = {cell_key(r) for r in sweeps.read_results(path)}
    if cell_key(make_record(sweep, cell)) not in done:
      todo.append((cell, path))
  return todo


def make_record(sweep, cell):
  config = make_config(sweep, cell, "")
  return dict(method=cell["method"], c=cell["c"], depth=cell.get("depth"),
              batch_size=config.batch_size, momentum=config.momentum, lr=cell["lr"],
              epochs=cell["epochs"], seed=cell["seed"], gn_groups=cell.get("gn_groups"),
              width_multiplier=cell.get("width_multiplier"), use_bias=config.use_bias,
              impl_lambda=cell.get("impl_lambda"))


def cell_workdir(sweep, cell, results):
  stage = os.path.splitext(os.path.basename(results))[0]
  return os.path.join(sweeps.WORKDIR_ROOT.value, stage, cell_name(make_record(sweep, cell)))


def run_cell(sweep, cell, results, commit):
  config = make_config(sweep, cell, sweeps.DATA_DIR.value)
  record = make_record(sweep, cell)
  workdir = cell_workdir(sweep, cell, results)
  logging.info("Running %s", workdir)
  start = time.time()
  try:
    _, metrics = train.train_and_evaluate(config, workdir)
    record.update(val_acc=metrics["validation_acc"], test_acc=metrics.get("test_acc"),
                  val_loss=metrics["validation_loss"], train_time_s=metrics["train_time_s"],
                  diverged=False)
  except NonFiniteLossError as e:
    logging.warning("Cell diverged: %s", e)
    record.update(val_acc=None, test_acc=None, val_loss=None,
                  train_time_s=time.time() - start, diverged=True)
  record.update(curve=epoch_curve(workdir), commit=commit)
  sweeps.append_result(results, record)


def epoch_curve(workdir) -> list[list[float]]:
  """One row per evaluation of the run: [step, validation accuracy, the training
  loss and accuracy averaged over the logged windows since the previous one]
  (training batches are augmented and BatchNorm uses their statistics)."""
  curve, window = [], []
  for step, m in sorted(sweeps.metrics_by_step(workdir).items()):
    if "train_loss" in m:
      window.append((m["train_loss"], m["train_accuracy"]))
    if "validation_acc" in m:
      loss, acc = map(float, np.mean(window, axis=0)) if window else (None, None)
      curve.append([step, m["validation_acc"], loss, acc])
      window = []
  return curve


def add_curves(sweep, results_dir) -> int:
  """Adds `epoch_curve` to the records without one whose workdir has a log; returns
  how many got one."""
  added = 0
  for name in sorted(set(RESULT_FILES[sweep].values())):
    path = os.path.join(results_dir, name)
    stage = os.path.splitext(name)[0]

    def change(records):
      nonlocal added
      for r in records:
        if not r.get("curve"):
          curve = epoch_curve(os.path.join(sweeps.WORKDIR_ROOT.value, stage, cell_name(r)))
          if curve:
            r["curve"], added = curve, added + 1
      return records
    if os.path.exists(path):
      sweeps.update_results(path, change)
  return added


def main(argv):
  del argv
  commit = sweeps.commit_hash()  # the code this process imported, read once at start-up
  os.makedirs(sweeps.RESULTS_DIR.value, exist_ok=True)
  if _ADD_CURVES.value:
    logging.info("Curves added to %d records.", add_curves(_SWEEP.value, sweeps.RESULTS_DIR.value))
    return
  sweeps.run_free_cells(lambda: run_next_free_cell(_SWEEP.value, sweeps.RESULTS_DIR.value,
                                                  commit))


def run_next_free_cell(sweep, results_dir, commit) -> bool:
  """Runs the first pending cell no other process holds; False if there is none."""
  return sweeps.run_next_free_cell(lambda: pending_cells(sweep, results_dir),
                                  lambda cell, results: cell_workdir(sweep, cell, results),
                                  lambda cell, results: run_cell(sweep, cell, results, commit=commit))


if __name__ == "__main__":
  app.run(main)
