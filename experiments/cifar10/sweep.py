r"""Resumable sweeps of the paper's CIFAR-10 experiments.

Every finished cell appends one record to the results JSON; a rerun skips the
cells already there (and resumes a half-finished cell from its checkpoint).

    python -m experiments.cifar10.sweep --sweep=fc_search   # shortened LR search
    python -m experiments.cifar10.sweep --sweep=fc_final    # 60 epochs at the chosen LRs
    python -m experiments.cifar10.sweep --sweep=conv_reduced

The FC learning-rate search is SHORTENED: each LR of the paper's grid is trained
for `SEARCH_EPOCHS` epochs (same schedule shape, compressed), and the best
validation accuracy per (method, c, depth) picks the LR of the 60-epoch run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from absl import app, flags, logging

from experiments.cifar10 import train
from experiments.cifar10.configs import conv, conv_reduced, fc
from experiments.common.trainer import NonFiniteLossError

_SWEEP = flags.DEFINE_enum("sweep", "fc_search",
                           ["fc_search", "fc_final", "conv_reduced"], "Which sweep.")
_DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data/cifar10", "ImageFolder dir.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs", "Parent of run workdirs.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "experiments/results", "Results folder.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Stop after this many new cells (0: all).")

SEARCH_EPOCHS = 10
# (method, c) pairs; ENorm with c = 1 and 1.2.
FC_MAIN = [("baseline", 1.0), ("enorm", 1.0), ("enorm", 1.2), ("bn", 1.0)]
FC_EXTRA = [("gn", 1.0), ("path_sgd", 1.0), ("enorm_impl", 1.0)]
FC_EXTRA_DEPTHS = (3, 15)
CONV_METHODS = [("baseline", 1.0), ("bn", 1.0), ("gn", 1.0), ("enorm", 1.0), ("enorm", 1.2)]
CONV_BATCH_SIZES = (8, 32, 128)
KEY_FIELDS = ("method", "c", "depth", "batch_size", "momentum", "lr", "epochs", "seed",
              "gn_groups", "width_multiplier")


def commit_hash() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def cell_key(record) -> tuple:
  return tuple(record.get(k) for k in KEY_FIELDS)


def cell_name(cell) -> str:
  return "_".join(f"{k}={cell[k]}" for k in KEY_FIELDS if cell.get(k) is not None)


def read_results(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def append_result(path, record):
  records = read_results(path) + [record]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, path)


def fc_cells(stage, results_dir):
  cells = []
  # Depths 3 and 15 for every method first, so a partial sweep compares them all.
  pairs = [(m, c, d) for d in FC_EXTRA_DEPTHS for m, c in FC_MAIN + FC_EXTRA]
  pairs += [(m, c, d) for d in (1, 5, 10, 19) for m, c in FC_MAIN]
  if stage == "search":
    for method, c, depth in pairs:
      groups = fc.GN_GROUPS if method == "gn" else (None,)
      for g in groups:
        for lr in fc.LEARNING_RATES:
          cells.append(dict(method=method, c=c, depth=depth, lr=lr, epochs=SEARCH_EPOCHS,
                            gn_groups=g))
    return cells
  search = read_results(os.path.join(results_dir, "cifar10_fc_search.json"))
  for method, c, depth in pairs:
    candidates = [r for r in search if (r["method"], r["c"], r["depth"]) == (method, c, depth)
                  and r["val_acc"] is not None]
    if not candidates:
      continue  # its search is not finished yet
    best = max(candidates, key=lambda r: r["val_acc"])
    cells.append(dict(method=method, c=c, depth=depth, lr=best["lr"], epochs=60,
                      gn_groups=best.get("gn_groups")))
  return cells


def conv_cells():
  cells = []
  for batch_size in CONV_BATCH_SIZES:
    for momentum in conv.MOMENTUMS:
      for method, c in CONV_METHODS:
        cells.append(dict(method=method, c=c, batch_size=batch_size, momentum=momentum,
                          lr=0.05, epochs=conv_reduced.get_config().num_epochs,
                          gn_groups=32 if method == "gn" else None,
                          width_multiplier=conv_reduced.get_config().width_multiplier))
  return cells


def make_config(sweep, cell, data_dir):
  config = (fc if sweep.startswith("fc") else conv_reduced).get_config()
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
  if config.method == "path_sgd":
    config.weight_decay = 0.0
  return config


def main(argv):
  del argv
  sweep = _SWEEP.value
  if sweep == "conv_reduced":
    cells, results = conv_cells(), "cifar10_conv.json"
  else:
    stage = sweep.split("_")[1]
    cells = fc_cells(stage, _RESULTS_DIR.value)
    results = "cifar10_fc_search.json" if stage == "search" else "cifar10_fc.json"
  results = os.path.join(_RESULTS_DIR.value, results)
  os.makedirs(_RESULTS_DIR.value, exist_ok=True)
  new = 0
  for cell in cells:
    cell.setdefault("seed", 0)
    config = make_config(sweep, cell, _DATA_DIR.value)
    record = dict(method=cell["method"], c=cell["c"], depth=cell.get("depth"),
                  batch_size=config.batch_size, momentum=config.momentum, lr=cell["lr"],
                  epochs=cell["epochs"], seed=cell["seed"], gn_groups=cell.get("gn_groups"),
                  width_multiplier=cell.get("width_multiplier"))
    if cell_key(record) in {cell_key(r) for r in read_results(results)}:
      continue
    workdir = os.path.join(_WORKDIR_ROOT.value, f"cifar10_{sweep}", cell_name(record))
    logging.info("Running %s", workdir)
    start = time.time()
    try:
      metrics = train.train_and_evaluate(config, workdir)
      metrics.pop("final_state")
      record.update(val_acc=metrics["validation_acc"], test_acc=metrics.get("test_acc"),
                    val_loss=metrics["validation_loss"], train_time_s=metrics["train_time_s"],
                    diverged=False)
    except NonFiniteLossError as e:
      logging.warning("Cell diverged: %s", e)
      record.update(val_acc=None, test_acc=None, val_loss=None,
                    train_time_s=time.time() - start, diverged=True)
    record["commit"] = commit_hash()
    append_result(results, record)
    new += 1
    if _LIMIT.value and new >= _LIMIT.value:
      break


if __name__ == "__main__":
  app.run(main)
