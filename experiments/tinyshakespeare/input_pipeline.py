"""Character-level tiny Shakespeare: the first 90 % of the text trains, the rest validates.

Batches are random windows of ``context + 1`` characters, drawn from a generator
seeded by (seed, step), so a resumed run sees the same batches as an
uninterrupted one. Validation scores fixed, non-overlapping windows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Corpus:
  vocab: str
  train: np.ndarray  # int32 character ids
  validation: np.ndarray


def read_text(data_dir: str) -> str:
  """The text of ``data_dir/input.txt``, or of tfds 'tiny_shakespeare' if ``data_dir`` is ''."""
  if data_dir:
    path = os.path.join(data_dir, "input.txt")
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.data_dir={data_dir!r} has no input.txt; point it at "
                              "the folder holding tiny Shakespeare's input.txt, or use '' "
                              "for tfds.load('tiny_shakespeare').")
    with open(path, encoding="utf-8") as f:
      return f.read()
  import tensorflow_datasets as tfds
  splits = tfds.load("tiny_shakespeare", batch_size=-1)
  return "".join(tfds.as_numpy(splits[s])["text"][0].decode("utf-8")
                 for s in ("train", "validation", "test"))


def make_corpus(text: str, validation_fraction: float) -> Corpus:
  vocab = "".join(sorted(set(text)))
  ids = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  lookup = {ord(ch): i for i, ch in enumerate(vocab)}
  ids = np.array([lookup[c] for c in ids.tolist()], np.int32)
  cut = int(len(ids) * (1 - validation_fraction))
  return Corpus(vocab, ids[:cut], ids[cut:])


def train_batches(corpus: Corpus, batch_size: int, context: int, seed: int, start_step: int):
  """Yields {'tokens': (batch, context + 1)} from step ``start_step`` on."""
  step = start_step
  while True:
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(corpus.train) - context - 1, batch_size)
    yield {"tokens": np.stack([corpus.train[s:s + context + 1] for s in starts])}
    step += 1


def validation_batches(corpus: Corpus, batch_size: int, context: int, num_batches: int):
  """Non-overlapping validation windows, the same at every evaluation."""
  n = min(num_batches * batch_size, (len(corpus.validation) - 1) // context)
  windows = np.stack([corpus.validation[i * context:i * context + context + 1]
                      for i in range(n - n % batch_size)])
  for i in range(0, len(windows), batch_size):
    yield {"tokens": windows[i:i + batch_size]}
