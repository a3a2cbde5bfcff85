"""Fixtures for the experiment tests."""

import os

import numpy as np
import pytest
from PIL import Image

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """10 classes x 12 JPEGs of 32x32 whose colour depends on the class."""
  root = tmp_path_factory.mktemp("cifar_folder")
  rng = np.random.default_rng(0)
  for label, name in enumerate(CLASSES):
    os.makedirs(root / "train" / name)
    for i in range(12):
      base = np.full((32, 32, 3), 25 * label, np.uint8)
      noise = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
      Image.fromarray(base + noise).save(root / "train" / name / f"{i}.jpg")
  return str(root)
