r"""Table 2 of the paper on the reduced protocol: CIFAR-NV at batch 32 without momentum.

Part of ``python -m experiments.cifar10.report``: reads the Table 2 sweep's
``cifar10_conv_table2_search.json`` and ``cifar10_conv_table2.json`` and writes
``cifar10_conv_table2.md`` (the search, the finals, the paper's claims paired by
seed, the per-epoch curves) and ``cifar10_conv_table2.png``.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.common import sweeps
from experiments.common.reports import mean_std, method_label, pyplot, write_markdown

METHODS = ("Baseline", "BN", "GN", "ENorm-1", "ENorm-1.2")
# The paper's Table 2 claims at batch 32 without momentum (full protocol, 5 runs):
# method -> (reference method, the claimed difference in points).
CLAIMS = {"ENorm-1": ("Baseline", "+0.8"), "ENorm-1.2": ("BN", "within 0.1")}


def table(search, finals) -> str:
  """Table 2 on the reduced protocol: per method the searched rates' short-run
  accuracy, the chosen rate, the mean ± std over seeds, and the difference to the
  Baseline paired seed by seed (same data order), mean ± std over the seeds both
  finished."""
  def acc(r):
    return None if r.get("val_acc") is None else 100 * r["val_acc"]
  rates = sorted({r["lr"] for r in search})
  by = {(method_label(r), r["seed"]): acc(r) for r in finals}
  lines = ["### CIFAR-NV at batch 32 without momentum (Table 2), reduced protocol "
           "(configs/conv_table2.py)", "",
           "Validation accuracy %; search: the short runs at each rate.", "",
           "| method | search " + " / ".join(f"{lr:g}" for lr in rates)
           + " | lr | accuracy | vs Baseline (paired) | seeds |", "|---|---|---|---|---|---|"]
  for method in METHODS:
    tried = {r["lr"]: acc(r) for r in search if method_label(r) == method}
    runs = sorted((r for r in finals if method_label(r) == method), key=lambda r: r["seed"])
    accs = [acc(r) for r in runs if acc(r) is not None]
    cells = [" / ".join("div." if tried.get(lr, 0) is None else
                        f"{tried[lr]:.2f}" if lr in tried else "–" for lr in rates)]
    cells.append(f"{runs[0]['lr']:g}" if runs else "–")
    cells.append(mean_std(accs) if accs else "–")
    diffs = _paired(by, method, "Baseline")[1]
    cells.append("" if method == "Baseline" or not diffs else mean_std(diffs, signed=True))
    seeds = [r["seed"] for r in runs if acc(r) is not None]
    diverged = len(runs) - len(seeds)
    cells.append(",".join(map(str, seeds)) + (f" ({diverged} diverged)" if diverged else ""))
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines + [""] + _claims(by)) + "\n"


def _paired(by, method, reference) -> tuple[list, list]:
  """The seeds both ``method`` and ``reference`` finished (in ``by``: (method, seed) ->
  accuracy or None), and ``method``'s differences to ``reference`` on them."""
  seeds = sorted(s for m, s in by if m == method and by[m, s] is not None
                 and by.get((reference, s)) is not None)
  return seeds, [by[method, s] - by[reference, s] for s in seeds]


def _claims(by) -> list[str]:
  """One line per claim of the paper: its difference beside the one measured here,
  paired seed by seed (seeds share the data order)."""
  lines = ["The paper's claims (full protocol, 5 runs) beside this protocol, paired by seed:", ""]
  for method, (reference, paper) in CLAIMS.items():
    seeds, diffs = _paired(by, method, reference)
    here = (f"{mean_std(diffs, signed=True)} (seeds {','.join(map(str, seeds))})"
            if seeds else "not yet run")
    lines.append(f"* {method} − {reference}: paper {paper} points; here {here}.")
  return lines


def epoch_table(finals) -> str:
  """Per method, over the seeds whose record has its per-epoch curve: validation
  accuracy after each epoch, the last epoch's training loss and accuracy, and for
  each of the paper's claims the difference after each epoch, paired by seed."""
  curves = {(method_label(r), r["seed"]): np.array(r["curve"], dtype=float)
            for r in finals if r.get("curve") and r["val_acc"] is not None}  # finished runs
  if not curves:
    return ""
  lines = ["Per-epoch curves (the seeds whose run logs were kept): validation accuracy % "
           "after each epoch; training loss and accuracy % averaged over the last epoch's "
           "batches (augmented, BatchNorm on batch statistics).", "",
           "| method | seeds | validation accuracy by epoch | last-epoch training loss "
           "| last-epoch training accuracy |", "|---|---|---|---|---|"]
  for method in METHODS:
    seeds = sorted(s for m, s in curves if m == method)
    if not seeds:
      continue
    runs = np.stack([curves[method, s] for s in seeds])  # (seeds, epochs, 4)
    last_loss, last_acc = mean_std(runs[:, -1, 2], decimals=3), mean_std(100 * runs[:, -1, 3])
    lines.append(f"| {method} | {','.join(map(str, seeds))} | "
                 + " / ".join(f"{v:.1f}" for v in 100 * runs[:, :, 1].mean(0))
                 + f" | {last_loss} | {last_acc} |")
  lines.append("")
  for method, (reference, _) in CLAIMS.items():
    seeds = sorted(s for m, s in curves if m == method and (reference, s) in curves)
    if seeds:
      gaps = np.stack([curves[method, s][:, 1] - curves[reference, s][:, 1] for s in seeds])
      lines.append(f"* {method} − {reference} by epoch (seeds {','.join(map(str, seeds))}): "
                   + " / ".join(f"{v:+.1f}" for v in 100 * gaps.mean(0)) + " points.")
  return "\n".join(lines) + "\n"


def figure(finals, path) -> None:
  """Validation accuracy and training loss by epoch, mean over the seeds with curves."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for method in METHODS:
    runs = [np.array(r["curve"], dtype=float) for r in finals
            if r.get("curve") and r["val_acc"] is not None and method_label(r) == method]
    if runs:
      mean = np.mean(runs, axis=0)
      epochs = np.arange(1, len(mean) + 1)
      seeds = f"{len(runs)} seed" + "s" * (len(runs) > 1)
      axes[0].plot(epochs, 100 * mean[:, 1], marker="o", label=f"{method} ({seeds})")
      axes[1].plot(epochs, mean[:, 2], marker="o", label=method)
  axes[0].set(xlabel="epoch", ylabel="validation accuracy (%)")
  axes[1].set(xlabel="epoch", ylabel="training loss (epoch mean)")
  axes[0].legend()
  fig.suptitle("CIFAR-NV, batch 32, no momentum (reduced protocol)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render(d: str) -> None:
  """Writes Table 2's markdown and figure in directory ``d`` once its search has results."""
  search = os.path.join(d, "cifar10_conv_table2_search.json")
  if not os.path.exists(search):
    return
  finals = sweeps.read_results(os.path.join(d, "cifar10_conv_table2.json"))
  text = table(sweeps.read_results(search), finals)
  by_epoch = epoch_table(finals)
  write_markdown(os.path.join(d, "cifar10_conv_table2.md"),
                 text + ("\n" + by_epoch if by_epoch else ""), "python -m experiments.cifar10.report")
  if by_epoch:
    figure(finals, os.path.join(d, "cifar10_conv_table2.png"))
  print(text, by_epoch)
