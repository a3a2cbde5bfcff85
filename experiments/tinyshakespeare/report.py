r"""Tables and loss curves from the tiny-Shakespeare sweep's result files.

    python -m experiments.tinyshakespeare.report --results_dir=experiments/results

Reads ``tinyshakespeare_search.json`` (the shortened learning-rate search) and
``tinyshakespeare.json`` (full runs, several seeds) and writes
``tinyshakespeare.md`` and ``tinyshakespeare.png`` next to them.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app

from experiments.common import reports, sweeps
from experiments.tinyshakespeare import sweep, train

LABELS = {"adamw": "AdamW", "enorm": "ENorm(AdamW), all groups",
          "enorm_mlp": "ENorm(AdamW), MLP only", "enorm_attn": "ENorm(AdamW), attention + norms"}
MATCHED_LABEL = "AdamW, per-kind rates matched to ENorm's steps"
UNIFORM_LABEL = "AdamW, every kind at the matched rates' RMS"
TITLES = {"gpt": "GPT-style (LayerNorm, ReLU MLP)",
          "llama": "Llama-style (RMSNorm, RoPE, GQA, SwiGLU, nn.scan)"}


def search_table(records, arch: str = "gpt") -> str:
  records = [r for r in records if sweep.is_main(r, arch)]
  lrs = sorted({r["lr"] for r in records})
  lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
           "|---|" + "---|" * len(lrs)]
  for method in sweep.METHODS:
    cells = []
    for lr in lrs:
      found = [r for r in records if r["method"] == method and r["lr"] == lr]
      if not found:
        cells.append("–")
      elif found[0]["val_loss"] is None:
        cells.append("diverged")
      else:
        best = " **best**" if lr == sweep.best_rate(records, method, arch) else ""
        cells.append(f"{found[0]['val_loss']:.3f}{best}")
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def variant(record) -> tuple:
  """What a full run varies besides its seed: (method, c, weight decay, rate multipliers)."""
  return (record["method"], record["c"], sweep.field(record, "weight_decay"),
          sweep.field(record, "lr_multipliers"))


def is_uniform(multipliers: str) -> bool:
  """Whether ``multipliers`` names several kinds, all at the same multiplier."""
  values = list(train.parse_lr_multipliers(multipliers).values())
  return len(values) > 1 and len(set(values)) == 1


def label(row) -> str:
  if not row["lr_multipliers"]:
    return LABELS[row["method"]]
  return UNIFORM_LABEL if is_uniform(row["lr_multipliers"]) else MATCHED_LABEL


def final_rows(records, arch: str = "gpt") -> list[dict]:
  """Per method and control: its rate, seeds, final validation loss mean ± std,
  diverged count. Main runs first, then the controls in the order they first appear."""
  records = [r for r in records if sweep.field(r, "architecture") == arch]
  wd = sweep.default.get_config().weight_decay
  variants = [(m, 1.0, wd, "") for m in sweep.METHODS]
  variants += [v for v in dict.fromkeys(map(variant, records)) if v not in variants]
  rows = []
  for key in variants:
    runs = [r for r in records if variant(r) == key]
    if not runs:
      continue
    losses = [r["val_loss"] for r in runs if r["val_loss"] is not None]
    rows.append(dict(zip(("method", "c", "weight_decay", "lr_multipliers"), key),
                     lr=runs[0]["lr"], seeds=len(runs), diverged=len(runs) - len(losses),
                     mean=float(np.mean(losses)) if losses else None,
                     std=float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
                     units=runs[0].get("rescaled_units", 0)))
  return rows


def paired_difference(records, row, arch: str = "gpt") -> str:
  """Mean ± std over seeds of (row - AdamW at the row's weight decay) with the same
  seed (init and data order)."""
  loss = {(variant(r), r["seed"]): r["val_loss"] for r in records
          if sweep.field(r, "architecture") == arch}
  key = (row["method"], row["c"], row["weight_decay"], row["lr_multipliers"])
  adamw = lambda seed: loss.get((("adamw", 1.0, key[2], ""), seed))
  diffs = [v - adamw(seed) for (k, seed), v in loss.items()
           if k == key and v is not None and adamw(seed) is not None]
  if key == ("adamw", 1.0, key[2], "") or not diffs:
    return "–"
  return f"{reports.mean_std(diffs, signed=True, decimals=4)} (n={len(diffs)})"


def final_table(records, arch: str = "gpt") -> str:
  lines = ["| method | c | weight decay | lr | rescaled units | seeds "
           "| final validation loss (nats/char) | minus AdamW, same seed |",
           "|---|---|---|---|---|---|---|---|"]
  notes = []
  for row in final_rows(records, arch):
    if row["mean"] is None:
      loss = "diverged"
    else:
      loss = f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if row["std"] is not None else "")
      if row["diverged"]:
        loss += f" ({row['diverged']} diverged)"
    lines.append(f"| {label(row)} | {row['c']:g} | {row['weight_decay']:g} | "
                 f"{row['lr']:g} | {row['units']} | {row['seeds']} | {loss} | "
                 f"{paired_difference(records, row, arch)} |")
    if row["lr_multipliers"] and is_uniform(row["lr_multipliers"]):
      notes.append(f"\n{UNIFORM_LABEL}: `lr_multipliers={row['lr_multipliers']}` "
                   "(the matched multipliers' root mean square, weighted by each kind's "
                   "parameter count: their total step without their reallocation).")
    elif row["lr_multipliers"]:
      notes.append(f"\n{MATCHED_LABEL}: `lr_multipliers={row['lr_multipliers']}` "
                   "(the median ratio of ENorm's relative step to AdamW's per kind of "
                   "weight, steps 50-900 of the dynamics run).")
  return "\n".join(lines + notes)


def at_enorm_rate_table(at_rate, finals) -> str:
  """Per architecture with such runs: AdamW at the rate the dynamics run measured the
  step ratios at (ENorm's), plain and with the matched rates, beside ENorm's main
  runs at that rate, each paired with plain AdamW at that rate."""
  text = ""
  for arch in sweep.ARCHITECTURES:
    runs = [r for r in at_rate if sweep.field(r, "architecture") == arch]
    if not runs:
      continue
    lr = runs[0]["lr"]
    enorm = [r for r in finals if r["method"] == "enorm" and r["lr"] == lr
             and sweep.is_main(r, arch) and r["num_steps"] == runs[0]["num_steps"]]
    text += (f"\n### {TITLES[arch]}: AdamW at ENorm's rate\n\nAdamW at {lr:g}, the rate "
             "of the dynamics run that measured the matched rates, beside ENorm's full "
             "runs at that rate; differences to plain AdamW at that rate:\n\n"
             + final_table(runs + enorm, arch) + "\n")
  return text


def _curves_by_run(records) -> dict:
  """(method, seed) -> {step: validation loss}."""
  return {(r["method"], r["seed"]): dict(map(tuple, r["curve"])) for r in records}


def long_table(records) -> str:
  """The longer schedule: validation loss at every evaluation, and the paired gap
  (ENorm - AdamW, same seed) per seed."""
  if not records:
    return ""
  arch = sweep.field(records[0], "architecture")
  method = next((r["method"] for r in records if r["method"] != "adamw"), None)
  curves = _curves_by_run(records)
  seeds = sorted({s for m, s in curves if m == "adamw" and (method, s) in curves})
  if method is None or not seeds:
    return ""
  steps = sorted(set.intersection(*[set(curves[m, s]) for s in seeds
                                    for m in ("adamw", method)]))
  lines = [f"\n### Longer schedule: {TITLES[arch]}, {records[0]['num_steps']} steps\n",
           f"AdamW against {LABELS[method]}, seeds {', '.join(map(str, seeds))}; validation "
           "loss (mean over seeds) and the gap seed by seed:\n",
           "| step | AdamW | ENorm | gap per seed |", "|---|---|---|---|"]
  for step in steps:
    a = [curves["adamw", s][step] for s in seeds]
    e = [curves[method, s][step] for s in seeds]
    gaps = ", ".join(f"{y - x:+.4f}" for x, y in zip(a, e))
    lines.append(f"| {step} | {np.mean(a):.4f} | {np.mean(e):.4f} | {gaps} |")
  return "\n".join(lines) + "\n"


def figure(search, finals, path) -> None:
  plt = reports.pyplot()
  archs = [a for a in sweep.ARCHITECTURES
           if any(sweep.field(r, "architecture") == a for r in search + finals)] or ["gpt"]
  fig, axes = plt.subplots(len(archs), 2, figsize=(11, 4 * len(archs)), squeeze=False)
  for arch, (curves, rates) in zip(archs, axes):
    for method in sweep.METHODS:
      runs = [r for r in finals if r["method"] == method and r["val_loss"] is not None
              and sweep.is_main(r, arch)]
      if runs:
        steps = [s for s, _ in runs[0]["curve"]]
        losses = np.array([[v for _, v in r["curve"]] for r in runs
                           if [s for s, _ in r["curve"]] == steps])
        mean, std = losses.mean(0), losses.std(0)
        curves.plot(steps, mean, label=f"{LABELS[method]} (lr {runs[0]['lr']:g}, "
                    f"{len(losses)} seeds)")
        curves.fill_between(steps, mean - std, mean + std, alpha=0.25)
      done = sorted((r["lr"], r["val_loss"]) for r in search if r["method"] == method
                    and r["val_loss"] is not None and sweep.is_main(r, arch))
      if done:
        rates.plot(*zip(*done), marker="o", label=LABELS[method])
    curves.set(xlabel="step", ylabel="validation loss (nats/char)", ylim=(None, 2.6),
               title=f"{TITLES[arch]}: mean ± std over seeds")
    rates.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss",
              title=f"Learning-rate search ({sweep.SEARCH_STEPS} steps)")
    for ax in (curves, rates):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def long_figure(records, path) -> bool:
  """The longer schedule's validation loss per run and the paired gap (ENorm -
  AdamW, same seed) at every evaluation; False (no file) until a seed has both."""
  curves = _curves_by_run(records)
  pairs = sorted((m, s) for m, s in curves if m != "adamw" and ("adamw", s) in curves)
  if not pairs:
    return False
  plt = reports.pyplot()
  fig, (losses, gaps) = plt.subplots(1, 2, figsize=(11, 4))
  for (method, seed), curve in sorted(curves.items()):
    losses.plot(list(curve), list(curve.values()), label=f"{LABELS[method]}, seed {seed}")
  for method, seed in pairs:
    steps = sorted(set(curves[method, seed]) & set(curves["adamw", seed]))
    gaps.plot(steps, [curves[method, seed][t] - curves["adamw", seed][t] for t in steps],
              marker="o", label=f"seed {seed}")
  gaps.axhline(0.0, color="k", lw=0.8)
  losses.set(xlabel="step", ylabel="validation loss (nats/char)", ylim=(None, 2.6))
  gaps.set(xlabel="step", ylabel="minus AdamW's, same seed (nats/char)",
           title=f"{LABELS[pairs[0][0]]}: validation loss minus AdamW's")
  for ax in (losses, gaps):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Longer schedule, {records[0]['num_steps']} steps")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def render(results_dir: str) -> str:
  search = sweeps.read_results(os.path.join(results_dir, sweep.SEARCH_FILE))
  finals = sweeps.read_results(os.path.join(results_dir, sweep.FINAL_FILE))
  text = "## Tiny Shakespeare: AdamW against ENorm(AdamW)\n"
  for arch in sweep.ARCHITECTURES:
    if not any(sweep.field(r, "architecture") == arch for r in search + finals):
      continue
    text += (f"\n### {TITLES[arch]}\n\n"
             f"Learning-rate search, seed 0, {sweep.SEARCH_STEPS} steps "
             "(final validation loss, nats per character):\n\n" + search_table(search, arch) +
             "\n\nFull runs at each method's best rate, then the controls (no weight "
             "decay; c = 1.2; per-kind rates):\n\n" + final_table(finals, arch) + "\n")
  text += at_enorm_rate_table(
      sweeps.read_results(os.path.join(results_dir, sweep.AT_ENORM_RATE_FILE)), finals)
  long_runs = sweeps.read_results(os.path.join(results_dir, sweep.LONG_FILE))
  text += long_table(long_runs)
  long_figure(long_runs, os.path.join(results_dir, "tinyshakespeare_long.png"))
  reports.write_markdown(os.path.join(results_dir, "tinyshakespeare.md"), text,
                         "python -m experiments.tinyshakespeare.report")
  figure(search, finals, os.path.join(results_dir, "tinyshakespeare.png"))
  return text


def main(argv):
  del argv
  print(render(sweeps.RESULTS_DIR.value))


if __name__ == "__main__":
  app.run(main)
