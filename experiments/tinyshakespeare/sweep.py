r"""Resumable sweep of the tiny-Shakespeare experiment: AdamW against enorm(AdamW).

    python -m experiments.tinyshakespeare.sweep --data_dir=../shared/data/tinyshakespeare

For each architecture of `ARCHITECTURES`, first a SHORTENED learning-rate search:
every method at each rate of `SEARCH_LRS` for `SEARCH_STEPS` steps (the same
warmup + cosine schedule, compressed). Then, architecture by architecture, the full
runs (the default config's length) at each method's best rate for every seed of
`SEEDS`, and the controls at the same rates: AdamW and ENorm on every group
without weight decay (every seed), and ENorm with c = `CONTROL_C` (seed 0). Then
the longer schedule (`long_choice`). Last, the learning-rate controls: AdamW with
per-kind learning rates matched to ENorm's relative steps
(`train.matched_multipliers`, every seed; where the dynamics tool has measured the
architecture, `DYNAMICS_FILE`) and with every kind at their size-weighted root mean
square (`train.uniform_multipliers`); where AdamW's searched rate is not the
rate the dynamics run measured the ratios at (ENorm's), AdamW at that rate, plain
and with the matched rates (every seed, `AT_ENORM_RATE_FILE`). Each finished cell
appends a record, with its validation-loss curve, to its stage's results file
(`tinyshakespeare_search.json`, `tinyshakespeare.json`, ...); workers may run in parallel
(see `experiments.common.sweeps`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, logging

from experiments.common import sweeps
from experiments.common.trainer import NonFiniteLossError
from experiments.tinyshakespeare import train
from experiments.tinyshakespeare.configs import default


ARCHITECTURES = ("gpt", "llama")
METHODS = train.METHODS
SEARCH_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEARCH_STEPS = 300
SEEDS = (0, 1, 2)
CONTROL_C = 1.2
LONG_STEPS, LONG_SEEDS = 3000, (0, 1)
KEY_FIELDS = ("architecture", "method", "c", "weight_decay", "lr", "num_steps", "seed",
              "lr_multipliers")
SEARCH_FILE, FINAL_FILE = "tinyshakespeare_search.json", "tinyshakespeare.json"
LONG_FILE = "tinyshakespeare_long.json"
# AdamW at the dynamics run's rate (ENorm's), plain and with the matched rates.
AT_ENORM_RATE_FILE = "tinyshakespeare_at_enorm_rate.json"
DYNAMICS_FILE = "tinyshakespeare_dynamics_{}.json"  # per architecture


def field(record, name):
  """A record's field; records made before a field existed had the default config's."""
  config = default.get_config()
  return record.get(name, config.get(name))


def cell_key(record) -> tuple:
  return tuple(field(record, k) for k in KEY_FIELDS)


def is_main(record, architecture: str) -> bool:
  """Whether ``record`` is a main-protocol run (default c, weight decay and rates) of
  ``architecture``."""
  config = default.get_config()
  return (field(record, "architecture") == architecture and record["c"] == 1.0
          and field(record, "weight_decay") == config.weight_decay
          and not field(record, "lr_multipliers"))


def best_rate(records, method, architecture: str = "gpt") -> float | None:
  """The rate with the lowest final validation loss (diverged runs never win)."""
  done = [r for r in records if r["method"] == method and r["val_loss"] is not None
          and is_main(r, architecture)]
  return min(done, key=lambda r: r["val_loss"])["lr"] if done else None


def paired_gain(records, method, architecture) -> float | None:
  """Mean over seeds of (AdamW - method) final validation loss, main protocol, when
  both have every seed of `SEEDS` finite; else None."""
  loss = {(r["method"], r["seed"]): r["val_loss"] for r in records
          if is_main(r, architecture) and r["num_steps"] == default.get_config().num_steps}
  pairs = [(loss.get(("adamw", s)), loss.get((method, s))) for s in SEEDS]
  if any(a is None or b is None for a, b in pairs):
    return None
  return float(np.mean([a - b for a, b in pairs]))


def long_choice(finals) -> tuple[str, str] | None:
  """(architecture, ENorm method) with the largest paired gain, once every
  architecture's every method has its full runs; else None."""
  gains = {(a, m): paired_gain(finals, m, a) for a in ARCHITECTURES for m in METHODS
           if m != "adamw"}
  if any(g is None for g in gains.values()):
    return None
  return max(gains, key=gains.get)


def all_cells(results_dir) -> list[tuple[dict, str]]:
  """(cell, results file) pairs in priority order: every architecture's search, then
  architecture by architecture its full runs seed by seed and its weight-decay and c
  controls, then the longer schedule, then the learning-rate controls (the matched
  per-kind rates, their uniform control, and AdamW at the rate the ratios were
  measured at)."""
  config = default.get_config()
  search = sweeps.read_results(os.path.join(results_dir, SEARCH_FILE))
  searched = {cell_key(r) for r in search}
  stages = ([], [], [], [])  # search, full runs and controls, longer schedule, rates
  for arch in ARCHITECTURES:
    base = dict(architecture=arch, c=1.0, weight_decay=config.weight_decay)
    arch_search = [dict(base, method=m, lr=lr, num_steps=SEARCH_STEPS, seed=0)
                   for m in METHODS for lr in SEARCH_LRS]
    stages[0].extend((c, SEARCH_FILE) for c in arch_search)
    rate = {m: best_rate(search, m, arch) for m in METHODS
            if all(cell_key(c) in searched for c in arch_search if c["method"] == m)}
    rate = {m: lr for m, lr in rate.items() if lr is not None}
    final = lambda m, seed, **kw: (dict(base, method=m, lr=rate[m], num_steps=config.num_steps,
                                        seed=seed, **kw), FINAL_FILE)
    stages[1].extend(final(m, seed) for seed in SEEDS for m in METHODS if m in rate)
    dynamics_path = os.path.join(results_dir, DYNAMICS_FILE.format(arch))
    if "adamw" in rate and os.path.exists(dynamics_path):
      with open(dynamics_path) as f:
        dynamics = json.load(f)
      matched = train.matched_multipliers(dynamics)
      stages[3].extend(final("adamw", seed, lr_multipliers=matched) for seed in SEEDS)
      arch_config = default.get_config()
      arch_config.architecture = arch
      uniform = train.uniform_multipliers(matched, train.kind_sizes(arch_config))
      stages[3].extend(final("adamw", seed, lr_multipliers=uniform) for seed in SEEDS)
      measured_at = dynamics["config"]["learning_rate"]  # where the ratios hold
      if measured_at != rate["adamw"]:
        at_rate = lambda seed, **kw: (dict(final("adamw", seed, **kw)[0], lr=measured_at),
                                      AT_ENORM_RATE_FILE)
        stages[3].extend(at_rate(seed, **kw) for seed in SEEDS
                         for kw in ({}, {"lr_multipliers": matched}))
    stages[1].extend(final(m, seed, weight_decay=0.0) for seed in SEEDS
                     for m in ("adamw", "enorm") if m in rate)
    stages[1].extend([final("enorm", SEEDS[0], c=CONTROL_C)] if "enorm" in rate else [])
  choice = long_choice(sweeps.read_results(os.path.join(results_dir, FINAL_FILE)))
  if choice is not None:
    arch, method = choice
    base = dict(architecture=arch, c=1.0, weight_decay=config.weight_decay,
                num_steps=LONG_STEPS)
    stages[2].extend((dict(base, method=m, lr=best_rate(search, m, arch), seed=seed),
                      LONG_FILE) for seed in LONG_SEEDS for m in ("adamw", method))
  return [cell for stage in stages for cell in stage]


def pending_cells(results_dir) -> list[tuple[dict, str]]:
  todo = []
  for cell, name in all_cells(results_dir):
    path = os.path.join(results_dir, name)
    if cell_key(cell) not in {cell_key(r) for r in sweeps.read_results(path)}:
      todo.append((cell, path))
  return todo


def make_config(cell, data_dir):
  config = default.get_config()
  config.data_dir = data_dir
  config.method, config.c, config.seed = cell["method"], cell["c"], cell["seed"]
  config.architecture = field(cell, "architecture")
  config.weight_decay = field(cell, "weight_decay")
  config.lr_multipliers = field(cell, "lr_multipliers")
  config.learning_rate = cell["lr"]
  if cell["num_steps"] != config.num_steps:  # stretch or compress the schedule
    scale = cell["num_steps"] / config.num_steps
    config.warmup_steps = round(config.warmup_steps * scale)
    config.num_steps = cell["num_steps"]
  return config


def cell_workdir(cell, results) -> str:
  stage = os.path.splitext(os.path.basename(results))[0]
  # Fields at an empty default are left out, as they were before the field existed.
  return os.path.join(sweeps.WORKDIR_ROOT.value, stage,
                      "_".join(f"{k}={field(cell, k)}" for k in KEY_FIELDS
                               if field(cell, k) != ""))


def validation_curve(workdir) -> list[list[float]]:
  """[step, validation loss] pairs from the run's metrics log."""
  return [[step, m["validation_loss"]]
          for step, m in sorted(sweeps.metrics_by_step(workdir).items())
          if "validation_loss" in m]


def median_steps_per_second(workdir) -> float | None:
  rates = [m["train_steps_per_second"] for _, m in sorted(sweeps.metrics_by_step(workdir).items())
           if "train_steps_per_second" in m]
  return float(np.median(rates[1:])) if len(rates) > 1 else None  # the first has compiles


def run_cell(cell, results, commit):
  workdir = cell_workdir(cell, results)
  logging.info("Running %s", workdir)
  record, start = dict(cell), time.time()
  try:
    _, metrics = train.train_and_evaluate(make_config(cell, sweeps.DATA_DIR.value), workdir)
    record.update(val_loss=metrics["validation_loss"], diverged=False,
                  rescaled_units=metrics["rescaled_units"])
  except NonFiniteLossError as e:
    logging.warning("Cell diverged: %s", e)
    record.update(val_loss=None, diverged=True)
  record.update(curve=validation_curve(workdir), train_time_s=time.time() - start,
                steps_per_second=median_steps_per_second(workdir), commit=commit)
  sweeps.append_result(results, record)


def main(argv):
  del argv
  commit = sweeps.commit_hash()  # the code this process imported, read once at start-up
  os.makedirs(sweeps.RESULTS_DIR.value, exist_ok=True)
  sweeps.run_free_cells(lambda: sweeps.run_next_free_cell(
      lambda: pending_cells(sweeps.RESULTS_DIR.value), cell_workdir,
      lambda cell, results: run_cell(cell, results, commit)))


if __name__ == "__main__":
  app.run(main)
