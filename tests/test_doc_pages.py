"""The Python blocks of README.md and of every page under docs/ run as written, from
a plain (non-editable) install of the package, in a directory outside the
repository; their relative links point to files."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def python_blocks(page: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory):
  """A fresh venv with the package installed from a wheel of this checkout; its
  dependencies (jax, flax, optax) come from the test environment's site-packages."""
  tmp = tmp_path_factory.mktemp("plain_install")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                  str(tmp / "wheel"), str(ROOT)], check=True)
  subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
  python = tmp / "venv" / "bin" / "python"
  wheel = next((tmp / "wheel").glob("enorm_jax-*.whl"))
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                 check=True)
  site = subprocess.check_output(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      text=True).strip()
  # Plain directories only: the editable install's hook is a .pth file of the test
  # environment, which a path listed here does not run.
  deps = [p for p in sys.path if p.endswith("site-packages")]
  (pathlib.Path(site) / "test_environment.pth").write_text("\n".join(deps) + "\n")
  return python, tmp


def test_readme_has_python_blocks():
  assert len(python_blocks("README.md")) >= 3


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run_from_a_plain_install(plain_python, page):
  python, tmp = plain_python
  script = tmp / (page.replace("/", "_") + ".py")
  check = ("import enorm_jax, enorm_jax.models\n"
           f"assert not enorm_jax.__file__.startswith({str(ROOT)!r}), enorm_jax.__file__\n")
  script.write_text(check + "\n\n".join(python_blocks(page)))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([str(python), str(script)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  if page == "README.md":
    assert "loss after 3 steps" in result.stdout


def test_every_relative_link_of_the_docs_points_to_a_file():
  broken = []
  for page in PAGES + [str(p.relative_to(ROOT)) for p in (ROOT / "experiments").rglob(
      "README.md")]:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / page).read_text()):
      if not (ROOT / page).parent.joinpath(target).exists():
        broken.append(f"{page}: {target}")
  assert not broken, broken
