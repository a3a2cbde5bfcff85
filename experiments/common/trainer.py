"""Training infrastructure shared by the CIFAR-10 and ImageNet experiments.

* Data parallelism with `jax.jit` over a 1-D `Mesh` of all devices: the batch is
  sharded along ``'data'``, the train state replicated (and donated).
* Orbax checkpoints: a restarted run resumes from the newest readable checkpoint;
  a corrupt one is skipped with a warning.
* Metrics to ``metrics.jsonl`` and TensorBoard (clu), and a tqdm progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or Inf loss."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


DATA_AXIS = "data"  # the mesh axis the batch is split over


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``'data'`` mesh over the first ``num_devices`` devices (0: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {n} devices; "
                     f"choose a multiple of {n} (e.g. {n * max(1, batch_size // n)}).")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, split along the leading axis."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def check_workdir(workdir: str) -> None:
  """Fails early (not after hours of training) if ``workdir`` cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"\0" * (1 << 20))
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise OSError(f"workdir {workdir!r} is not writable ({e.strerror}); checkpoints and "
                  "metrics go there. Choose another --workdir or free disk space.") from e


class Checkpoints:
  """Orbax checkpoints of a `TrainState` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, state: TrainState) -> None:
    """Saves ``state`` at its step, replacing a checkpoint already there (one that
    `restore_latest` skipped as unreadable, e.g. of an older state structure)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      log.warning("Replacing the checkpoint at step %d in %s.", step, self.directory)
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def restore_latest(self, template: TrainState) -> TrainState | None:
    """The newest checkpoint that restores cleanly, or ``None``; skips corrupt ones."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # corrupt or partial checkpoint
        log.warning("Checkpoint at step %d in %s is unreadable (%s: %s); falling back to "
                    "an older one.", step, self.directory, type(e).__name__, e)
    return None


class MetricsWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and to TensorBoard via clu; on
  process 0 only (the others write nothing)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    try:
      from clu import metric_writers
      self._tb = metric_writers.create_default_writer(workdir, just_logging=False,
                                                      asynchronous=False)
    except Exception as e:  # TensorBoard is optional; JSONL always works
      log.warning("TensorBoard writer unavailable (%s); writing JSONL only.", e)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), metrics)
      self._tb.flush()


def progress(total: int, initial: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              mininterval=2.0, disable=os.environ.get("ENORM_NO_PROGRESS") == "1"
              or jax.process_index() > 0)


def fit(state: TrainState, *, train_step: Callable, batches: Callable[[int], Iterator],
        mesh: Mesh, total_steps: int, steps_per_epoch: int, workdir: str,
        evaluate: Callable[[TrainState], dict[str, float]],
        checkpoint_every_steps: int, log_every_steps: int, eval_every_epochs: int = 1,
        stop_at_step: int = 0, images_per_step: int = 0, desc: str = "train",
        diagnose: Callable[[TrainState], None] | None = None
        ) -> tuple[TrainState, dict[str, float]]:
  """The training loop: resume, step, log, evaluate per epoch, checkpoint.

  ``batches(start_step)`` yields host batches from ``start_step`` on. Returns the
  final state and the last evaluation metrics. ``stop_at_step > 0`` returns
  early after that step's checkpoint, as a preemption would (for tests).
  ``diagnose(state)``, called when the training loss is non-finite, may raise a
  more precise error (`enorm_jax.raise_if_misapplied`).
  """
  checkpoints = Checkpoints(workdir)
  # Restore onto this run's mesh: a checkpoint written by any number of processes
  # restores in any other.
  state = jax.device_put(state, replicated(mesh))
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state = restored
    log.info("Resumed from step %d.", int(restored.step))
  writer = MetricsWriter(workdir)
  start = int(jax.device_get(state.step))
  last_eval: dict[str, float] = {}
  pending: list[dict[str, jax.Array]] = []
  t0, seen = time.perf_counter(), 0
  with progress(total_steps, start, desc) as bar:
    data = batches(start)
    for step in range(start, total_steps):
      batch = shard_batch(next(data), mesh)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      seen += 1
      done = step + 1
      if done % log_every_steps == 0 or done == total_steps:
        summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending]))
                   for k in pending[0]}
        pending = []
        if not math.isfinite(summary["loss"]):
          if diagnose is not None:
            diagnose(state)
          raise NonFiniteLossError(
              f"Non-finite training loss ({summary['loss']}) at step {done}. The last good "
              f"checkpoint is kept in {checkpoints.directory}. Lower the learning rate "
              "or check the data.")
        summary["steps_per_second"] = seen / (time.perf_counter() - t0)
        if images_per_step:
          summary["images_per_second"] = summary["steps_per_second"] * images_per_step
        t0, seen = time.perf_counter(), 0
        writer.write(done, {f"train_{k}": v for k, v in summary.items()})
        bar.set_postfix(loss=f"{summary['loss']:.4f}", refresh=False)
      if done % steps_per_epoch == 0 and (done // steps_per_epoch) % eval_every_epochs == 0 \
          or done == total_steps:
        last_eval = evaluate(state)
        writer.write(done, {**last_eval, "epoch": done / steps_per_epoch})
        if not all(math.isfinite(v) for k, v in last_eval.items() if k.endswith("loss")):
          raise NonFiniteLossError(
              f"Non-finite evaluation loss at step {done}: {last_eval}. The last good "
              f"checkpoint is kept in {checkpoints.directory}.")
      if done % checkpoint_every_steps == 0 or done == total_steps:
        checkpoints.save(state)
      bar.update(1)
      if done == stop_at_step:
        return state, last_eval
  if not last_eval:
    last_eval = evaluate(state)
  return state, last_eval


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums (not means) of loss, top-1 and top-5 hits, and the example count."""
  import optax
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
          "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
