r"""Starts N local processes of one training command, as N hosts would run it.

    python -m experiments.launch --processes=2 --devices_per_process=2 -- \
        python -m experiments.cifar10.main --distributed --workdir=workdirs/fc3 \
        --config=experiments/cifar10/configs/fc.py

Every process gets ``JAX_COORDINATOR_ADDRESS`` (a free loopback port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, read by ``--distributed``
(`experiments.common.distributed`); ``--devices_per_process`` simulates CPU
devices. Output lines are prefixed with ``[p<id>]``. When any process fails, the
others are stopped and the launcher exits with the failed process's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_PROCESSES = flags.DEFINE_integer("processes", 2, "Number of local processes.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 0,
                                "Simulated CPU devices per process (0: leave XLA_FLAGS).")
_GRACE = flags.DEFINE_float("grace_seconds", 10.0, "After a failure, how long the other "
                            "processes get to exit after SIGTERM before SIGKILL.")


def free_loopback_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, processes: int, port: int, devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(process_id),
             PYTHONUNBUFFERED="1")
  if devices:
    flags_ = [f for f in env.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _relay(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()


def launch(command: list[str], processes: int, devices: int = 0,
           grace_seconds: float = 10.0) -> int:
  """Runs ``command`` in ``processes`` local processes; returns the exit code (0: all
  succeeded; otherwise the first failure's code, negative for a signal)."""
  if "--distributed" not in command:
    raise ValueError("The command must pass --distributed, or every process would train "
                     f"alone into the same workdir: {' '.join(command)}")
  port = free_loopback_port()
  procs, relays = [], []
  for i in range(processes):
    p = subprocess.Popen(command, env=process_env(i, processes, port, devices),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         process_group=0)  # its own group, stopped as one
    procs.append(p)
    relays.append(threading.Thread(target=_relay, args=(p.stdout, f"[p{i}] ", sys.stdout),
                                   daemon=True))
    relays[-1].start()
  failed = None
  try:
    while failed is None and any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      time.sleep(0.2)
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.returncode), None)
  except KeyboardInterrupt:
    failed = -1
  if failed is not None:
    _stop(procs, grace_seconds)
  for t in relays:
    t.join(timeout=5)
  if failed is None:
    return 0
  if failed == -1:
    return 130
  code = procs[failed].returncode
  reason = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
  print(f"[launch] process {failed} failed ({reason}); stopped the others.", file=sys.stderr)
  return code


def _stop(procs, grace_seconds: float) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  deadline = time.time() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def main(argv):
  command = argv[1:]
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    raise app.UsageError("Give the command after --, e.g. -- python -m "
                         "experiments.cifar10.main --distributed ...")
  code = launch(command, _PROCESSES.value, _DEVICES.value, _GRACE.value)
  sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
  app.run(main)
