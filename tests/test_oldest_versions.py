"""The oldest jax, flax and optax that pyproject.toml declares pass the library's tests.

A fresh virtual environment gets exactly the declared lower bounds (jaxlib pinned
with jax) and runs the library tests that reach the most of those packages' APIs:
graphs, the NNX recipes and the optax wrapper in the training loops of
`tests/test_training_loops.py` (vmap, shard_map, lookahead, contrib optimizers,
bf16). The main run tests the newest releases.
"""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ["tests/test_graph.py", "tests/test_nnx_recipes.py", "tests/test_training_loops.py"]


def declared_minimums() -> dict[str, str]:
  """``{package: version}`` of the ``>=`` bounds of the runtime dependencies."""
  dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  minimums = {}
  for requirement in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement.strip())
    assert match, f"{requirement!r}: declare a lower bound with >= and no upper bound"
    minimums[match[1].lower()] = match[2]
  return minimums


def test_every_runtime_dependency_declares_a_lower_bound():
  assert set(declared_minimums()) == {"jax", "flax", "optax"}


@pytest.mark.slow  # ~3 min (a fresh environment from the registry): run with -m slow
def test_library_tests_pass_on_the_oldest_declared_versions(tmp_path):
  minimums = declared_minimums()
  pins = [f"{name}=={version}" for name, version in minimums.items()]
  pins.append(f"jaxlib=={minimums['jax']}")
  subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
  python = str(tmp_path / "venv" / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", *pins, "pytest", "chex",
                  "scipy"], check=True, capture_output=True, timeout=900)
  versions = subprocess.check_output(
      [python, "-c", "import jax, jaxlib, flax, optax; print(jax.__version__, "
       "jaxlib.__version__, flax.__version__, optax.__version__)"], text=True).split()
  assert versions == [minimums["jax"], minimums["jax"], minimums["flax"], minimums["optax"]]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(
      [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
