"""Formatting shared by the experiments' reports: mean ± std, labels, figures."""

from __future__ import annotations

import numpy as np


def method_label(record) -> str:
  """The paper's name of a CIFAR-10/ImageNet run's method: ``ENorm-1.2``, ``BN``, ..."""
  if record["method"] == "enorm":
    return f"ENorm-{record['c']:g}"
  return {"baseline": "Baseline", "bn": "BN", "gn": "GN", "path_sgd": "Path-SGD",
          "enorm_impl": "ENorm-Impl"}.get(record["method"], record["method"])


def mean_std(values, signed: bool = False, decimals: int = 2) -> str:
  """``"m ± s"`` (sample standard deviation), or ``"m"`` for a single value."""
  sign = "+" if signed else ""
  text = f"{np.mean(values):{sign}.{decimals}f}"
  return text + (f" ± {np.std(values, ddof=1):.{decimals}f}" if len(values) > 1 else "")


def pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def write_markdown(path: str, text: str, command: str) -> None:
  """Writes a report's markdown with the command that makes it."""
  with open(path, "w") as f:
    f.write(text + f"\nMade by `{command}`.\n")
