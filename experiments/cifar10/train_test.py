"""Fast end-to-end tests of the CIFAR-10 experiment on a small generated ImageFolder."""

import dataclasses
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from experiments.cifar10 import input_pipeline, train
from experiments.common.methods import METHODS
from experiments.cifar10.configs import conv_reduced, fc
from experiments.common import data as common
from experiments.common import methods, trainer


def small_config(image_folder, tmp_path, model="fc", method="baseline", **overrides):
  config = (fc if model == "fc" else conv_reduced).get_config()
  config.data_dir = image_folder
  config.cache_dir = str(tmp_path / "cache")
  config.num_validation = 24
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.learning_rate = 0.01
  config.log_every_steps = 2
  config.method = method
  if model == "fc":
    config.depth, config.width = 2, 32
  else:
    config.width_multiplier = 0.0625
  for k, v in overrides.items():
    config[k] = v
  return config


def run(config, workdir):
  state, metrics = train.train_and_evaluate(config, str(workdir))
  return metrics, state


# Every method runs on FC by default; on CIFAR-NV, BN and ENorm by default and
# the others in the slow set.
@pytest.mark.parametrize("model,method", [
    ("fc", m) for m in METHODS] + [
        ("cifar_nv", m) if m in ("bn", "enorm") else
        pytest.param("cifar_nv", m, marks=pytest.mark.slow) for m in METHODS if m != "path_sgd"])
def test_one_short_run_per_method(image_folder, tmp_path, model, method):
  config = small_config(image_folder, tmp_path, model, method)
  metrics, state = run(config, tmp_path / "work")
  assert metrics["steps"] == 2 * (96 // 16)
  assert 0.0 <= metrics["validation_acc"] <= 1.0 and np.isfinite(metrics["validation_loss"])
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))
  lines = open(tmp_path / "work" / "metrics.jsonl").read().splitlines()
  assert any("validation_acc" in line for line in lines)


def test_enorm_run_keeps_params_balanced(image_folder, tmp_path):
  config = small_config(image_folder, tmp_path, "fc", "enorm")
  _, state = run(config, tmp_path / "work")
  setup = train.create_setup(config, total_steps=1)
  import enorm_jax
  _, scales = enorm_jax.balance(state.params, setup.graph)
  assert max(float(np.max(np.abs(np.log(s)))) for s in scales) < 0.1


def test_eight_devices_match_one_device(image_folder, tmp_path):
  assert jax.device_count() == 8
  results = []
  for n in (1, 8):
    config = small_config(image_folder, tmp_path, "fc", "enorm", num_devices=n)
    results.append(run(config, tmp_path / f"work{n}")[1].params)
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["enorm", "bn"])
def test_resume_equals_uninterrupted_run(image_folder, tmp_path, method):
  config = small_config(image_folder, tmp_path, "fc", method, checkpoint_every_steps=4)
  _, full = run(config, tmp_path / "full")
  config.stop_at_step = 5  # "preempted" after step 5; the newest checkpoint is step 4
  run(config, tmp_path / "resumed")
  config.stop_at_step = 0
  metrics, resumed = run(config, tmp_path / "resumed")
  chex.assert_trees_all_equal(resumed.params, full.params)
  chex.assert_trees_all_equal(resumed.batch_stats, full.batch_stats)
  assert metrics["steps"] == 12


def test_evaluate_entry_point_scores_checkpoint(image_folder, tmp_path):
  config = small_config(image_folder, tmp_path, "fc", "enorm")
  metrics, _ = run(config, tmp_path / "work")
  scored = train.evaluate_checkpoint(config, str(tmp_path / "work"), "validation")
  assert scored["step"] == 12
  assert scored["validation_acc"] == pytest.approx(metrics["validation_acc"])
  with pytest.raises(ValueError, match="split='test' is not available"):
    train.evaluate_checkpoint(config, str(tmp_path / "work"), "test")


def test_evaluate_any_split_of_any_folder_with_the_training_statistics(image_folder, tmp_path):
  """A folder holding only test/ is scored, normalized with the training data's stats."""
  config = small_config(image_folder, tmp_path, "fc", "baseline")
  run(config, tmp_path / "work")
  test_only = tmp_path / "test_only"
  shutil.copytree(os.path.join(image_folder, "train"), test_only / "test")
  scored = train.evaluate_checkpoint(config, str(tmp_path / "work"), "test",
                                        str(test_only))
  # The same images through the training split's own normalization give the same
  # scores; the statistics of the scored folder (here, all 120 images) would not.
  ds = input_pipeline.load(config)
  images = np.concatenate([ds.splits["train"][0], ds.splits["validation"][0]])
  labels = np.concatenate([ds.splits["train"][1], ds.splits["validation"][1]])
  reference = dataclasses.replace(ds, splits={"all": (images, labels)})
  setup = train.create_setup(config, total_steps=1)
  state = trainer.Checkpoints(str(tmp_path / "work")).restore_latest(setup.state)
  mesh = trainer.make_mesh(config.num_devices)
  _, eval_fn = methods.make_steps(setup, mesh)
  expected = train.evaluate_splits(eval_fn, state, reference, config, mesh, ["all"])
  assert scored["test_acc"] == pytest.approx(expected["all_acc"])
  assert scored["test_loss"] == pytest.approx(expected["all_loss"], rel=1e-5)
  assert not np.allclose(input_pipeline.load_for_evaluation(
      config, str(tmp_path / "work"), str(test_only), "test").mean, images.mean((0, 1, 2)) / 255)
  with pytest.raises(ValueError, match="split='valid' is not available.*available: \\['test'\\]"):
    train.evaluate_checkpoint(config, str(tmp_path / "work"), "valid", str(test_only))


def test_splits_are_deterministic_and_disjoint(image_folder, tmp_path):
  config = small_config(image_folder, tmp_path)
  a, b = input_pipeline.load(config), input_pipeline.load(config)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(a.splits[split][0], b.splits[split][0])
  assert a.size("train") == 96 and a.size("validation") == 24
  train_idx, val_idx = common.split_train_validation(50_000, 10_000, seed=0)
  assert len(train_idx) == 40_000 and len(val_idx) == 10_000
  assert not set(train_idx) & set(val_idx)
  again = common.split_train_validation(50_000, 10_000, seed=0)
  np.testing.assert_array_equal(again[1], val_idx)


def test_training_batches_are_reproducible(image_folder, tmp_path):
  config = small_config(image_folder, tmp_path, "cifar_nv")
  ds = input_pipeline.load(config)
  stream = input_pipeline.train_batches(ds, config)
  first = [next(stream) for _ in range(8)]
  resumed = next(input_pipeline.train_batches(ds, config, start_step=7))
  np.testing.assert_array_equal(first[7]["image"], resumed["image"])
  assert first[0]["image"].shape == (16, 28, 28, 3)


@pytest.mark.parametrize("field,value,match", [
    ("method", "dropout", "config.method='dropout' is unknown"),
    ("c", 0.0, "config.c=0.0 must be > 0"),
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("data_dir", "/nonexistent/cifar", "must be a tfds ImageFolder directory"),
])
def test_bad_configs_fail_at_start_up(image_folder, tmp_path, field, value, match):
  config = small_config(image_folder, tmp_path, **{field: value})
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    train.train_and_evaluate(config, str(tmp_path / "work"))
