"""CIFAR-10 input pipeline: tfds or a local ImageFolder, a 40k/10k split, augmentation.

Images are decoded once (through tensorflow-datasets) and cached as uint8 arrays,
so later runs start in seconds. Batches are cut from memory with numpy; batch
``b`` of epoch ``e`` depends only on ``(seed, e, b)``, so a resumed run sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from experiments.common import data as common

CROP = 28


@dataclasses.dataclass
class Dataset:
  """In-memory splits (uint8 images, int32 labels), the train-split channel stats and
  the class names (``None`` for tfds, whose order is CIFAR-10's)."""

  splits: dict[str, tuple[np.ndarray, np.ndarray]]
  mean: np.ndarray
  std: np.ndarray
  classes: list[str] | None = None

  def size(self, split: str) -> int:
    return len(self.splits[split][1])


def _read_source(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  if config.data_dir:
    images, labels, classes = common.read_image_folder(config.data_dir, "train")
    return {"train_images": images, "train_labels": labels, "classes": np.asarray(classes)}
  import tensorflow_datasets as tfds
  arrays = {}
  for split in ("train", "test"):
    images, labels = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1,
                                             as_supervised=True,
                                             data_dir=config.get("tfds_data_dir") or None))
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.int32)
  return arrays


def load(config: ml_collections.ConfigDict) -> Dataset:
  """Loads CIFAR-10 and splits its training images into train / validation.

  ``config.data_dir``: an ImageFolder directory (``train/<class>/*.jpg``); empty
  means ``tfds.load('cifar10')``, which also gives the test split.
  """
  if config.data_dir:
    common.check_image_folder(config.data_dir)
  source = config.data_dir or f"tfds:cifar10:{config.get('tfds_data_dir')}"
  arrays = common.cached(f"cifar10|{source}", config.get("cache_dir") or common.DEFAULT_CACHE_DIR,
                         lambda: _read_source(config))
  images, labels = arrays["train_images"], arrays["train_labels"]
  train_idx, val_idx = common.split_train_validation(len(labels), config.num_validation,
                                                     config.split_seed)
  splits = {"train": (images[train_idx], labels[train_idx]),
            "validation": (images[val_idx], labels[val_idx])}
  if "test_images" in arrays:
    splits["test"] = (arrays["test_images"], arrays["test_labels"])
  if config.get("train_subset"):
    x, y = splits["train"]
    splits["train"] = (x[:config.train_subset], y[:config.train_subset])
  pixels = splits["train"][0].reshape(-1, 3).astype(np.float64) / 255.0  # f32 sums saturate
  classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
  return Dataset(splits, pixels.mean(axis=0).astype(np.float32),
                 pixels.std(axis=0).astype(np.float32), classes)


STATS_FILE = "data_stats.json"


def save_stats(ds: Dataset, workdir: str) -> None:
  """Stores the training data's normalization statistics and classes in ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, STATS_FILE), "w") as f:
    json.dump({"mean": ds.mean.tolist(), "std": ds.std.tolist(), "classes": ds.classes}, f)


def load_for_evaluation(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                        split: str) -> Dataset:
  """``split`` of ``data_dir`` (any ImageFolder, or '' for tfds), normalized with the
  statistics of the data the checkpoint in ``workdir`` was trained on.

  The training data's 'train' and 'validation' are the 40k/10k split of
  training; any other split, or any split of another folder, is read whole.
  """
  stats_path = os.path.join(workdir, STATS_FILE)
  trained_on = None  # the training data, loaded at most once
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      stats = json.load(f)
    mean, std, classes = (np.float32(stats["mean"]), np.float32(stats["std"]),
                          stats["classes"])
  else:  # written by every training run; older workdirs: recompute from the config
    trained_on = load(config)
    mean, std, classes = trained_on.mean, trained_on.std, trained_on.classes
  if data_dir == config.data_dir and split in ("train", "validation"):
    return dataclasses.replace(trained_on or load(config), mean=mean, std=std)
  if not data_dir:
    import tensorflow_datasets as tfds
    images, labels = tfds.as_numpy(tfds.load(
        "cifar10", split=split, batch_size=-1, as_supervised=True,
        data_dir=config.get("tfds_data_dir") or None))
    return Dataset({split: (images, labels.astype(np.int32))}, mean, std, classes)
  available = sorted(d for d in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, d))) if os.path.isdir(data_dir) else []
  if split not in available:
    raise ValueError(f"split={split!r} is not available from {data_dir!r}; "
                     f"available: {available}.")
  images, labels, found = common.read_image_folder(data_dir, split)
  if classes is not None and list(found) != list(classes):
    raise ValueError(f"The classes of {data_dir}/{split} ({found}) are not those the "
                     f"checkpoint was trained on ({classes}).")
  return Dataset({split: (images, labels)}, mean, std, classes)


def _normalize(images: np.ndarray, ds: Dataset) -> np.ndarray:
  return ((images.astype(np.float32) / 255.0 - ds.mean) / ds.std).astype(np.float32)


def _crop_flip(images: np.ndarray, rng: np.random.Generator, batch_rows: slice,
               batch_size: int) -> np.ndarray:
  """Random CROP x CROP crops and horizontal flips, vectorized over the batch.

  ``images`` are ``batch_rows`` of a larger batch; the draws are those of the whole
  batch, so an image's crop does not depend on how the batch is split over processes.
  """
  n, h, w, _ = images.shape
  top = rng.integers(0, h - CROP + 1, batch_size)[batch_rows]
  left = rng.integers(0, w - CROP + 1, batch_size)[batch_rows]
  flip = (rng.random(batch_size) < 0.5)[batch_rows]
  rows = top[:, None] + np.arange(CROP)[None, :]
  cols = left[:, None] + np.arange(CROP)[None, :]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _center_crop(images: np.ndarray) -> np.ndarray:
  h, w = images.shape[1:3]
  top, left = (h - CROP) // 2, (w - CROP) // 2
  return images[:, top:top + CROP, left:left + CROP]


def preprocess(images: np.ndarray, ds: Dataset, model: str, train: bool,
               rng: np.random.Generator | None = None, rows: slice | None = None,
               batch_size: int | None = None) -> np.ndarray:
  """FC: normalized, flattened 32x32x3. Conv: crop + flip (train) or centre crop.

  ``images`` are ``rows`` of a batch of ``batch_size`` for which ``rng`` draws the
  crops (default: the whole batch).
  """
  if model == "fc":
    return _normalize(images, ds).reshape(len(images), -1)
  if train:
    images = _crop_flip(images, rng, rows or slice(0, len(images)),
                        batch_size or len(images))
  else:
    images = _center_crop(images)
  return _normalize(images, ds)


def process_rows(batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (`jax.process_index()`)."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {count} "
                     f"processes; choose a multiple of {count}.")
  per = batch_size // count
  return slice(index * per, (index + 1) * per)


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  return ds.size("train") // batch_size


def train_batches(ds: Dataset, config: ml_collections.ConfigDict, start_step: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches from global step ``start_step`` on (drop-remainder).

  Each process gets its rows of the global batch, the same rows whatever the
  process count.
  """
  images, labels = ds.splits["train"]
  per_epoch = steps_per_epoch(ds, config.batch_size)
  rows = process_rows(config.batch_size)
  step = start_step
  while True:
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(labels))
    idx = np.sort(order[b * config.batch_size:(b + 1) * config.batch_size])[rows]
    rng = np.random.default_rng([config.seed, epoch, b, 1])
    yield {"image": preprocess(images[idx], ds, config.model, True, rng, rows,
                                config.batch_size),
           "label": labels[idx]}
    step += 1


def eval_batches(ds: Dataset, split: str, config: ml_collections.ConfigDict,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ``split`` padded to ``batch_size``; ``mask`` marks real examples.

  Each process gets its rows of every global batch: every example is scored once.
  """
  images, labels = ds.splits[split]
  rows = process_rows(batch_size)
  for start in range(0, len(labels), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(len(y), np.float32)
    pad = batch_size - len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield {"image": preprocess(x[rows], ds, config.model, False), "label": y[rows],
           "mask": mask[rows]}
