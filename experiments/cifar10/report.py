r"""Markdown tables and Figure-4-style plots from the CIFAR-10 result files.

    python -m experiments.cifar10.report --results_dir=experiments/results

Reads ``cifar10_fc.json`` (60-epoch runs), ``cifar10_fc_search.json`` (the
shortened learning-rate search), ``cifar10_fc_rate_check.json`` (60-epoch runs at
the search's second-best rate), the same first two with biases (``*_bias.json``) and
``cifar10_conv.json`` and the Table 2 sweep's two files when present, and writes
``<name>.md`` and ``<name>.png`` next to each.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from absl import app

from experiments.cifar10 import table2
from experiments.common import sweeps
from experiments.common.reports import mean_std, method_label, pyplot, write_markdown


def best_by(records, key_fn):
  """The record with the best validation accuracy for each key (diverged runs skipped)."""
  best = {}
  for r in records:
    if r.get("val_acc") is None:
      continue
    k = key_fn(r)
    if k not in best or r["val_acc"] > best[k]["val_acc"]:
      best[k] = r
  return best


def shown_by(records, key_fn):
  """(best, shown): `best_by`, and that plus a diverged record for keys with no other run."""
  best = best_by(records, key_fn)
  return best, {**{key_fn(r): r for r in records if r.get("val_acc") is None}, **best}


def _fmt(r):
  if r is None:
    return "–"
  if r.get("val_acc") is None:
    return f"diverged (lr {r['lr']:g})"
  text = f"{100 * r['val_acc']:.2f}"
  if r.get("test_acc") is not None:
    text += f" / {100 * r['test_acc']:.2f}"
  return text + f" (lr {r['lr']:g}{_setting(r)})"


def seed_summaries(records, key_fn):
  """Per key, the (lr, GN groups, ENorm-Impl weight) setting with the best mean accuracy over
  its seeds: a record with ``val_acc`` (the mean), ``std``, ``seeds`` (finished runs)
  and ``diverged`` (runs that diverged); a key whose every run diverged keeps
  ``val_acc=None``."""
  runs = collections.defaultdict(list)
  for r in records:
    runs[(key_fn(r), r["lr"], r.get("gn_groups"), r.get("impl_lambda"))].append(r)
  shown = {}
  for (key, *_), rs in runs.items():
    accs = [r["val_acc"] for r in rs if r.get("val_acc") is not None]
    summary = dict(rs[0], val_acc=float(np.mean(accs)) if accs else None,
                   std=float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                   seeds=len(accs), diverged=len(rs) - len(accs))
    old = shown.get(key)
    if old is None or (summary["val_acc"] is not None and
                       (old["val_acc"] is None or summary["val_acc"] > old["val_acc"])):
      shown[key] = summary
  return shown


def _fmt_seeds(r):
  if r is None:
    return "–"
  if r["val_acc"] is None:
    return f"diverged (lr {r['lr']:g})"
  text = f"{100 * r['val_acc']:.2f}"
  if r["std"] is not None:
    text += f" ± {100 * r['std']:.2f}"
  seeds = f", {r['seeds']} seeds" if r["seeds"] > 1 else ""
  diverged = f", {r['diverged']} diverged" if r["diverged"] else ""
  return text + f" (lr {r['lr']:g}{_setting(r)}{seeds}{diverged})"


def _setting(r) -> str:
  """A run's searched setting beside its rate: GN's groups, ENorm-Impl's weight."""
  if r.get("gn_groups"):
    return f", {r['gn_groups']} groups"
  if r.get("impl_lambda") is not None:
    return f", λ {r['impl_lambda']:g}"
  return ""


def fc_table(records, title) -> tuple[str, dict]:
  shown = seed_summaries(records, lambda r: (method_label(r), r["depth"]))
  best = {k: v for k, v in shown.items() if v["val_acc"] is not None}
  depths = sorted({d for _, d in shown})
  methods = sorted({m for m, _ in shown}, key=lambda m: list(LABEL_ORDER).index(m)
                   if m in LABEL_ORDER else 99)
  epochs = sorted({r["epochs"] for r in records})
  lines = [f"### {title}", "",
           f"Validation accuracy % at the best learning rate per cell: mean ± standard "
           f"deviation over seeds where several ran; epochs: {epochs}; runs: {len(records)}.",
           "", "| method | " + " | ".join(f"depth {d}" for d in depths) + " |",
           "|---" * (len(depths) + 1) + "|"]
  for m in methods:
    lines.append(f"| {m} | " + " | ".join(_fmt_seeds(shown.get((m, d))) for d in depths)
                 + " |")
  return "\n".join(lines) + "\n", best


COMMAND = "python -m experiments.cifar10.report"
LABEL_ORDER = ("Baseline", "BN", "GN", "ENorm-1", "ENorm-1.2", "ENorm-Impl", "Path-SGD")
FIGURE8_METHODS = ("Baseline", "BN", "GN", "ENorm-Impl", "Path-SGD")


def figure8_table(records, against: str = "ENorm-1.2") -> str:
  """Figure 8's comparison: at depths where GN, ENorm-Impl or Path-SGD ran, each
  method at its best setting (`seed_summaries`) minus ``against`` with the same seed
  (same data order), mean ± std over the seeds both finished, in points."""
  key = lambda r: (method_label(r), r["depth"])
  shown = seed_summaries(records, key)
  depths = sorted({d for m, d in shown if m in ("GN", "ENorm-Impl", "Path-SGD")})
  if not depths:
    return ""

  def accuracies(method, depth):  # seed -> accuracy % at the shown setting
    s = shown.get((method, depth))
    setting = lambda r: (r["lr"], r.get("gn_groups"), r.get("impl_lambda"))
    return {} if s is None else {
        r["seed"]: 100 * r["val_acc"] for r in records
        if key(r) == (method, depth) and setting(r) == setting(s) and r.get("val_acc") is not None}

  lines = [f"### Figure 8: each method minus {against}, same seed", "",
           f"Validation accuracy points, mean ± std over the seeds both finished (seeds in "
           f"brackets); each method at its setting in the table above.", "",
           "| method | " + " | ".join(f"depth {d}" for d in depths) + " |",
           "|---" * (len(depths) + 1) + "|"]
  for method in FIGURE8_METHODS:
    cells = []
    for depth in depths:
      ours, theirs = accuracies(method, depth), accuracies(against, depth)
      seeds = sorted(set(ours) & set(theirs))
      cells.append(f"{mean_std([ours[s] - theirs[s] for s in seeds], signed=True)} "
                   f"({','.join(map(str, seeds))})" if seeds else "–")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def fc_figure(best, path, title):
  plt = pyplot()
  series = collections.defaultdict(list)
  for (m, d), r in sorted(best.items(), key=lambda kv: kv[0][1]):
    series[m].append((d, 100 * r["val_acc"], 100 * (r.get("std") or 0.0)))
  fig, ax = plt.subplots(figsize=(6, 4))
  for m in sorted(series, key=lambda m: LABEL_ORDER.index(m) if m in LABEL_ORDER else 99):
    xs, ys, errs = zip(*series[m])
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=m)
  ax.set(xlabel="number of intermediary layers", ylabel="validation accuracy (%)", title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def conv_table(records) -> tuple[str, dict]:
  best, shown = shown_by(records, lambda r: (method_label(r), r["batch_size"], r["momentum"]))
  cols = sorted({(b, mo) for _, b, mo in shown})
  setting = ", ".join(sorted({f"width x{r.get('width_multiplier') or 1:g}, "
                              f"{r['epochs']} epochs" for r in records}))
  setting += ", lr " + " or ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in records}))
  lines = ["### CIFAR-NV with biases, REDUCED protocol (see configs/conv_reduced.py)", "",
           f"Validation accuracy %, one seed, the best of the rates run per cell (not a "
           f"full search; see configs/conv_reduced.py); "
           f"{setting}; runs finished: {len(records)}.", "",
           "| method | " + " | ".join(f"B={b}, m={mo:g}" for b, mo in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for m in LABEL_ORDER:
    if any(k[0] == m for k in shown):
      lines.append(f"| {m} | " + " | ".join(_fmt(shown.get((m, b, mo))) for b, mo in cols)
                   + " |")
  return "\n".join(lines) + "\n", best


def conv_bias_table(records) -> str:
  """Each run without biases beside the same cell (method, batch, momentum, rate,
  seed) with biases."""
  def cell(r):
    return (method_label(r), r["batch_size"], r["momentum"], r["lr"], r["seed"],
            r["epochs"], r.get("width_multiplier"))
  with_bias = {cell(r): r for r in records if r.get("use_bias", True)}
  lines = ["### CIFAR-NV with and without biases, REDUCED protocol (see "
           "configs/conv_reduced.py)", "",
           "Validation accuracy %, one seed; `diverged`: non-finite loss.", "",
           "| batch | momentum | lr | method | with biases | without biases | difference |",
           "|---|---|---|---|---|---|---|"]
  rows = sorted((r for r in records if not r.get("use_bias", True)),
                key=lambda r: (r["batch_size"], r["momentum"], r["lr"],
                               LABEL_ORDER.index(method_label(r))))
  for r in rows:
    other = with_bias.get(cell(r))
    accs = [None if x is None or x["val_acc"] is None else 100 * x["val_acc"]
            for x in (other, r)]
    diff = f"{accs[1] - accs[0]:+.2f}" if None not in accs else ""
    shown = ["not run" if x is None else "diverged" if a is None else f"{a:.2f}"
             for x, a in zip((other, r), accs)]
    lines.append(f"| {r['batch_size']} | {r['momentum']:g} | {r['lr']:g} | "
                 f"{method_label(r)} | {shown[0]} | {shown[1]} | {diff} |")
  return "\n".join(lines) + "\n"


def conv_figure(best, path):
  """Validation accuracy against batch size, one panel per momentum (Tables 2-3)."""
  plt = pyplot()
  momentums = sorted({mo for _, _, mo in best})
  fig, axes = plt.subplots(1, len(momentums), figsize=(5 * len(momentums), 4), squeeze=False,
                           sharey=True)
  for ax, mo in zip(axes[0], momentums):
    for m in LABEL_ORDER:
      points = sorted((b, 100 * r["val_acc"]) for (mm, b, mmo), r in best.items()
                      if mm == m and mmo == mo)
      if points:
        ax.plot(*zip(*points), marker="o", label=m)
    ax.set(xscale="log", xlabel="batch size", title=f"CIFAR-NV (reduced), momentum {mo:g}")
    ax.legend()
  axes[0][0].set_ylabel("validation accuracy (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render(d: str) -> None:
  """Writes the tables and figures of every result file in directory ``d``."""
  for name, title in (
      ("cifar10_fc", "FC without biases, 60 epochs (paper protocol)"),
      ("cifar10_fc_search", "FC without biases, 5-epoch learning-rate search (shortened)"),
      ("cifar10_fc_rate_check", "FC without biases, 60 epochs at the search's second-best rate"),
      ("cifar10_fc_bias", "FC with biases, 60 epochs (paper protocol, one seed)"),
      ("cifar10_fc_search_bias", "FC with biases, 10-epoch learning-rate search")):
    path = os.path.join(d, f"{name}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      records = json.load(f)
    table, best = fc_table(records, title)
    if name == "cifar10_fc":
      table += "\n" + figure8_table(records)
    write_markdown(os.path.join(d, f"{name}.md"), table, COMMAND)
    fc_figure(best, os.path.join(d, f"{name}.png"), title)
    print(table)
  table2.render(d)
  path = os.path.join(d, "cifar10_conv.json")
  if os.path.exists(path):
    with open(path) as f:
      records = json.load(f)
    biased = [r for r in records if r.get("use_bias", True)]
    if biased:
      table, best = conv_table(biased)
      write_markdown(os.path.join(d, "cifar10_conv.md"), table, COMMAND)
      conv_figure(best, os.path.join(d, "cifar10_conv.png"))
      print(table)
    if len(biased) < len(records):
      table = conv_bias_table(records)
      write_markdown(os.path.join(d, "cifar10_conv_no_bias.md"), table, COMMAND)
      print(table)


def main(argv):
  del argv
  render(sweeps.RESULTS_DIR.value)


if __name__ == "__main__":
  app.run(main)
