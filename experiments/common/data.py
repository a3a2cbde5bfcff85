"""Shared input-pipeline pieces: ImageFolder/tfds reading, decoded caches, batching."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "enorm_jax")


def check_image_folder(data_dir: str) -> None:
  """Raises a clear error if ``data_dir`` is not an ImageFolder with a train split."""
  train = os.path.join(data_dir, "train")
  if not os.path.isdir(train):
    raise FileNotFoundError(
        f"data_dir={data_dir!r} must be a tfds ImageFolder directory containing "
        f"'train/<class>/*.jpg' (missing {train!r}). Set config.data_dir to such a "
        "directory, or to '' to use tfds.load with internet access.")


def read_image_folder(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Decodes one split of an ImageFolder directory, sorted by file name.

  Returns ``(images uint8 [N, H, W, 3], labels int32 [N], class names)``.
  """
  import tensorflow_datasets as tfds
  builder = tfds.ImageFolder(data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  names, images, labels = [], [], []
  for ex in tfds.as_numpy(ds):
    names.append(ex["image/filename"])
    images.append(ex["image"])
    labels.append(ex["label"])
  order = np.argsort(np.asarray(names))
  return (np.stack(images)[order], np.asarray(labels, np.int32)[order],
          builder.info.features["label"].names)


def cached(key: str, cache_dir: str, build: Callable[[], dict[str, np.ndarray]]
           ) -> dict[str, np.ndarray]:
  """Returns ``build()``, stored as an .npz under ``cache_dir`` after the first call."""
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, f"{digest}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return dict(f)
  arrays = build()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return arrays


def split_train_validation(n: int, num_validation: int, seed: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic, disjoint (train, validation) index split of ``range(n)``."""
  if not 0 < num_validation < n:
    raise ValueError(f"num_validation must be in (0, {n}), got {num_validation}.")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[num_validation:]), np.sort(perm[:num_validation])


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs ``iterator`` in a background thread, ``size`` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # re-raised in the consumer
      q.put(e)
    q.put(done)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
