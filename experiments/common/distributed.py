"""Multi-process (multi-host) runs: `jax.distributed` set up from flags or the environment.

One process per host (GPU cluster), per TPU VM worker, or several local processes
for development (`experiments.launch`). Each flag left unset falls back to the
environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
then to JAX's cluster auto-detection (SLURM, Open MPI, TPU pod slices, GKE).
"""

from __future__ import annotations

import ipaddress
import os

import jax
from absl import flags, logging

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one process of several (jax.distributed.initialize).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator "
    "(default: $JAX_COORDINATOR_ADDRESS, then cluster auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES, then "
    "cluster auto-detection).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: $JAX_PROCESS_ID, then cluster "
    "auto-detection).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "A process that sends no heartbeat for this long "
    "is declared dead and every other process stops with an error.")

ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer.") from None


def _is_loopback(address: str) -> bool:
  host = address.rsplit(":", 1)[0].strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def initialize() -> None:
  """Joins the process group if ``--distributed``; quiets logs on processes > 0.

  Call first in ``main``, before any JAX computation. On CPU the collectives run
  over gloo (TCP). A loopback coordinator also binds to loopback only.
  """
  if not _DISTRIBUTED.value:
    return
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _NUM_PROCESSES.value
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  process_id = _PROCESS_ID.value
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  bind = address if address and _is_loopback(address) else None
  jax.distributed.initialize(address, num_processes, process_id,
                             coordinator_bind_address=bind,
                             heartbeat_timeout_seconds=_HEARTBEAT.value)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """True on the process that writes logs, metrics and results (process 0)."""
  return jax.process_index() == 0
