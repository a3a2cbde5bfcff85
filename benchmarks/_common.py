"""Timing helpers and model zoo shared by the benchmarks."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def median_ms(step: Callable[[Any], Any], state: Any, reps: int, warmup: int = 2
              ) -> tuple[float, Any]:
  """Median wall time (ms) of ``state = step(state)`` after warm-up; returns final state."""
  for _ in range(warmup):
    state = jax.block_until_ready(step(state))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state = jax.block_until_ready(step(state))
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times), state


def interleaved_ms(steps: dict[str, tuple[Callable[[Any], Any], Any]], reps: int,
                   warmup: int = 2) -> dict[str, float]:
  """Median wall time (ms) of ``state = step(state)`` per named (step, state).

  Each round calls every step once, so slow drifts of the machine hit all of
  them alike; ratios between the medians are side-by-side comparisons. The
  order rotates by one step per round, so that every step comes first equally
  often and none is favoured by its place in the round.
  """
  states = {name: state for name, (_, state) in steps.items()}
  times = {name: [] for name in steps}
  names = list(steps)
  for round_ in range(warmup + reps):
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      step = steps[name][0]
      t = time.perf_counter()
      states[name] = jax.block_until_ready(step(states[name]))
      if round_ >= warmup:
        times[name].append((time.perf_counter() - t) * 1e3)
  return {name: statistics.median(ts) for name, ts in times.items()}


def paper_models(quick: bool):
  """(name, model, input shape) for the paper's architectures at benchmark shapes."""
  from enorm_jax.models import CifarNV, FullyConnected, ResNet18C
  models = [("FC-15", FullyConnected(depth=15), (1, 3072)),
            ("CIFAR-NV", CifarNV(), (1, 28, 28, 3)),
            ("ResNet-18C", ResNet18C(), (1, 224, 224, 3))]
  return models


def init_params(model, shape, seed=0):
  return model.init(jax.random.key(seed), jnp.ones(shape))["params"]


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
  p.add_argument("--json", help="write the records to this JSON file")
  return p


def emit(records: list[dict], columns: list[str], path: str | None) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in records)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for r in records:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
  if path:
    with open(path, "w") as f:
      json.dump(records, f, indent=1)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  return str(v)
