"""Fault injection: kills, corrupt checkpoints and unwritable workdirs."""

import logging
import os
import random
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import pytest

from experiments.cifar10 import train
from experiments.cifar10.train_test import small_config
from experiments.common import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_state(value):
  return trainer.TrainState(step=jnp.asarray(value, jnp.int32),
                            params={"w": jnp.full((4, 4), float(value))}, batch_stats={},
                            opt_state=())


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  checkpoints = trainer.Checkpoints(str(tmp_path))
  checkpoints.save(tiny_state(1))
  checkpoints.save(tiny_state(2))
  latest = os.path.join(checkpoints.directory, "2")
  for dirpath, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
  with caplog.at_level(logging.WARNING):
    restored = trainer.Checkpoints(str(tmp_path)).restore_latest(tiny_state(0))
  assert int(restored.step) == 1
  assert float(restored.params["w"][0, 0]) == 1.0
  assert "unreadable" in caplog.text and "falling back" in caplog.text


def test_a_checkpoint_of_another_structure_is_skipped_then_replaced(tmp_path, caplog):
  """A run resumed after the state's structure changed starts afresh and saves
  over the stale checkpoint at the same step."""
  stale = trainer.TrainState(step=jnp.asarray(2, jnp.int32), params={"v": jnp.ones(3)},
                             batch_stats={}, opt_state=())
  trainer.Checkpoints(str(tmp_path)).save(stale)
  checkpoints = trainer.Checkpoints(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    assert checkpoints.restore_latest(tiny_state(0)) is None
    checkpoints.save(tiny_state(2))
  assert "unreadable" in caplog.text and "Replacing the checkpoint at step 2" in caplog.text
  restored = trainer.Checkpoints(str(tmp_path)).restore_latest(tiny_state(0))
  assert int(restored.step) == 2 and float(restored.params["w"][0, 0]) == 2.0


def test_unwritable_workdir_fails_at_start_up(image_folder, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  config = small_config(image_folder, tmp_path)
  start = time.time()
  with pytest.raises(OSError, match="is not writable.*Choose another --workdir"):
    train.train_and_evaluate(config, str(blocker / "workdir"))
  assert time.time() - start < 30


def test_full_disk_fails_at_start_up(tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tiny tmpfs here")
  try:
    with pytest.raises(OSError, match="not writable.*free disk space"):
      trainer.check_workdir(str(mount / "workdir"))
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def _main_command(config_overrides, workdir):
  args = [sys.executable, "-m", "experiments.cifar10.main", f"--workdir={workdir}",
          f"--config={os.path.join(ROOT, 'experiments/cifar10/configs/fc.py')}"]
  return args + [f"--config.{k}={v}" for k, v in config_overrides.items()]


@pytest.mark.slow
def test_sigkill_restarts_end_with_uninterrupted_params(image_folder, tmp_path):
  overrides = dict(data_dir=image_folder, cache_dir=str(tmp_path / "cache"), num_validation=24,
                   batch_size=16, eval_batch_size=16, num_epochs=6, depth=2, width=32,
                   method="enorm", checkpoint_every_steps=2, log_every_steps=2)
  config = small_config(image_folder, tmp_path, "fc", "enorm")
  for k, v in overrides.items():
    config[k] = v
  expected, _ = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

  workdir = tmp_path / "killed"
  env = dict(os.environ, ENORM_NO_PROGRESS="1", PYTHONPATH=ROOT)
  rng = random.Random(0)
  kills = 0
  for _ in range(3):
    proc = subprocess.Popen(_main_command(overrides, workdir), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(8.0, 16.0))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
    # Every checkpoint left behind restores cleanly.
    checkpoints = trainer.Checkpoints(str(workdir))
    for step in checkpoints.manager.all_steps():
      abstract = jax.tree.map(trainer.ocp.utils.to_shape_dtype_struct, expected)
      checkpoints.manager.restore(step, args=trainer.ocp.args.StandardRestore(abstract))
  assert kills >= 1
  final = subprocess.run(_main_command(overrides, workdir), cwd=ROOT, env=env,
                         capture_output=True, text=True)
  assert final.returncode == 0, final.stderr[-2000:]
  restored = trainer.Checkpoints(str(workdir)).restore_latest(expected)
  assert int(restored.step) == int(expected.step)
  chex.assert_trees_all_equal(restored.params, expected.params)
