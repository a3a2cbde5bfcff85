"""Machinery shared by the resumable sweeps: result files, cell claims, provenance.

A sweep appends one JSON record per finished cell to its results file; a rerun
skips the cells already there. Several worker processes may run one sweep at once
(e.g. one per core with `taskset`): each claims a cell with an exclusive lock on
`<cell workdir>/.claim`, which the OS drops when the process ends, so a killed
worker's cell is free for the next one, which resumes it from its checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from typing import Any, Callable, Iterator

from absl import flags, logging

Cell = dict[str, Any]

# The flags every sweep takes (defined once: the sweeps' modules import together).
DATA_DIR = flags.DEFINE_string("data_dir", "", "The data folder ('': tfds.load).")
WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs", "Parent of run workdirs.")
RESULTS_DIR = flags.DEFINE_string("results_dir", "experiments/results", "Results folder.")
LIMIT = flags.DEFINE_integer("limit", 0, "Stop after this many new cells (0: all).")


def commit_hash() -> str:
  """HEAD's short hash, with '+dirty' if the code (not the results) has local changes."""
  def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "enorm_jax",
                "experiments", ":(exclude)experiments/results")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def read_results(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def locked(path: str, blocking: bool = True) -> Iterator[bool]:
  """Holds an exclusive `flock` on `path`; yields False if taken and not blocking."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def update_results(path: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                   ) -> None:
  """Replaces the records with ``change(records)``, atomically, also against other
  sweep processes writing the same file."""
  with locked(f"{path}.lock"):
    records = change(read_results(path))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(records, f, indent=1)
    os.replace(tmp, path)


def append_result(path: str, record: dict[str, Any]) -> None:
  update_results(path, lambda records: records + [record])


def metrics_by_step(workdir: str) -> dict[int, dict[str, float]]:
  """A run's ``metrics.jsonl`` as step -> metrics; a resumed run's later writes
  replace the earlier ones ({} if the run has no log)."""
  rows, path = {}, os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for row in map(json.loads, f):
        rows.setdefault(row.pop("step"), {}).update(row)
  return rows


def run_next_free_cell(pending: Callable[[], list[tuple[Cell, str]]],
                       workdir: Callable[[Cell, str], str],
                       run: Callable[[Cell, str], None]) -> bool:
  """Runs the first pending (cell, results path) no other process holds.

  Returns False if there is none. ``pending()`` is re-read under the claim, since
  another process may have finished the cell meanwhile.
  """
  for cell, results in pending():
    with locked(os.path.join(workdir(cell, results), ".claim"), blocking=False) as claimed:
      if claimed and (cell, results) in pending():
        run(cell, results)
        return True
  return False


def run_free_cells(run_next: Callable[[], bool]) -> int:
  """Calls ``run_next()`` until it finds no free cell or ``--limit`` cells ran."""
  new = 0
  while run_next():
    new += 1
    if LIMIT.value and new >= LIMIT.value:
      break
  logging.info("No free cell left: %d run by this process.", new)
  return new
