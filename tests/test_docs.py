"""The API reference builds from the docstrings with no warning (README's command)."""

import pathlib
import subprocess
import sys


def test_api_docs_build_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-W", "error::UserWarning", "-m", "pdoc", "--docformat", "google",
       "-o", str(tmp_path), "enorm_jax", "enorm_jax.models"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Warn" not in result.stderr, result.stderr[-3000:]
  pages = {p.name for p in pathlib.Path(tmp_path).rglob("*.html")}
  assert {"enorm_jax.html", "models.html", "tracing.html", "contrib.html"} <= pages
  text = (tmp_path / "enorm_jax.html").read_text()
  for name in ("balance", "enorm", "trace_graph", "check_graph", "rescale"):
    assert f'id="{name}"' in text, name
