"""Timing helpers and model zoo shared by the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
                   warmup: int = 2, seed: int = 0) -> dict[str, float]:
  """Median wall time (ms) of ``state = step(state)`` per named (step, state).

  Each round calls every step once, so slow drifts of the machine hit all of
  them alike; ratios between the medians are side-by-side comparisons. The
  order is shuffled every round (seeded), so that no step always follows the
  same one: a step's time depends on the program before it, and with the order
  only rotated each step kept its predecessor (`benchmarks/RESULTS.md`).
  """
  states = {name: state for name, (_, state) in steps.items()}
  times = {name: [] for name in steps}
  names = list(steps)
  rng = np.random.default_rng(seed)
  for round_ in range(warmup + reps):
    for name in rng.permutation(names):
      step = steps[name][0]
      t = time.perf_counter()
      states[name] = jax.block_until_ready(step(states[name]))
      if round_ >= warmup:
        times[name].append((time.perf_counter() - t) * 1e3)
  return {name: statistics.median(ts) for name, ts in times.items()}


def placements_ms(steps: dict[str, tuple[Callable[[Any], Any], Any]], placements: int,
                  reps: int, warmup: int = 1) -> dict[str, list[float]]:
  """Per named (step, state), the median time (ms) of each of ``placements`` runs of
  `interleaved_ms`, each on fresh copies of the states (new buffers).

  A program's speed on this CPU depends on where its buffers lie, and a donated
  state keeps its buffers: one executable on three copies of its state differed
  by up to 4.7 % in one run of interleaved rounds, as much as a second
  compilation did (the GPT-style LM step; an exploratory script). Sampling many
  placements turns that bias into noise that the median over placements averages
  out. The states given are copied, never donated.
  """
  medians = {name: [] for name in steps}
  for placement in range(placements):
    fresh = {name: (step, jax.tree.map(jnp.copy, state)) for name, (step, state) in steps.items()}
    for name, ms in interleaved_ms(fresh, reps, warmup, seed=placement).items():
      medians[name].append(ms)
  return medians


def paired_ratio(numerator: list[float], denominator: list[float], draws: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
  """The median over placements of ``numerator[i] / denominator[i]`` (timed in the
  same rounds, so the machine's drifts cancel), and its 95 % bootstrap interval
  (placements resampled)."""
  ratios = np.asarray(numerator) / np.asarray(denominator)
  idx = np.random.default_rng(seed).integers(0, len(ratios), (draws, len(ratios)))
  low, high = np.percentile(np.median(ratios[idx], axis=1), [2.5, 97.5])
  return float(np.median(ratios)), float(low), float(high)


def machine() -> dict[str, Any]:
  """The processor, core count and JAX version that a result was measured with."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, cores=os.cpu_count(), jax=jax.__version__,
              backend=jax.default_backend())


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
      json.dump([dict(r, machine=machine()) for r in records], f, indent=1)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  return str(v)
