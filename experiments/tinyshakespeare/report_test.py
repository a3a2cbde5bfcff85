"""The tiny-Shakespeare report: tables with mean ± std, diverged runs, the figure."""

import json

from experiments.tinyshakespeare import report, sweep


def _run(method, lr, loss, seed=0, steps=300):
  curve = [[100, 2.5], [steps, loss]] if loss is not None else [[100, 2.5]]
  return dict(method=method, c=1.0, lr=lr, num_steps=steps, seed=seed, val_loss=loss,
              curve=curve, rescaled_units=0 if method == "adamw" else 64)


def test_render_writes_tables_and_figure(tmp_path):
  search = [_run("adamw", 1e-3, 2.0), _run("adamw", 1e-2, 1.9), _run("enorm", 1e-2, None),
            _run("enorm", 1e-3, 2.1)]
  finals = [_run("adamw", 1e-2, loss, seed, 1000) for seed, loss in enumerate((1.5, 1.6))]
  finals += [_run("enorm", 1e-3, None, 0, 1000), _run("enorm", 1e-3, 1.7, 1, 1000)]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(search))
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  text = report.render(str(tmp_path))
  assert "| AdamW | 2.000 | 1.900 **best** |" in text
  assert "| ENorm(AdamW), all groups | 2.100 **best** | diverged |" in text
  assert "| AdamW | 1 | 0.1 | 0.01 | 0 | 2 | 1.5500 ± 0.0707 | – |" in text
  assert ("| ENorm(AdamW), all groups | 1 | 0.1 | 0.001 | 64 | 2 | 1.7000 (1 diverged) "
          "| +0.1000 (n=1) |") in text
  assert "### GPT-style" in text and "### Llama-style" not in text
  assert (tmp_path / "tinyshakespeare.png").stat().st_size > 0
  # Controls (no weight decay, paired with AdamW without it) and the second model.
  finals += [dict(_run(m, 1e-3, loss, 0, 1000), weight_decay=0.0)
             for m, loss in (("adamw", 1.6), ("enorm", 1.55))]
  finals += [dict(_run("adamw", 3e-3, 1.4, 0, 1000), architecture="llama")]
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  text = report.render(str(tmp_path))
  assert ("| ENorm(AdamW), all groups | 1 | 0 | 0.001 | 64 | 1 | 1.5500 | -0.0500 (n=1) |"
          in text)
  assert "### Llama-style" in text and "| AdamW | 1 | 0.1 | 0.003 | 0 | 1 | 1.4000 | – |" in text
  assert (tmp_path / "tinyshakespeare.md").read_text() == (
      text + "\nMade by `python -m experiments.tinyshakespeare.report`.\n")
  # AdamW with per-kind rates: its own row, paired with plain AdamW, multipliers named.
  finals += [dict(_run("adamw", 1e-2, loss, seed, 1000), lr_multipliers="query=1.4")
             for seed, loss in enumerate((1.45, 1.58))]
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  text = report.render(str(tmp_path))
  assert (f"| {report.MATCHED_LABEL} | 1 | 0.1 | 0.01 | 0 | 2 | 1.5150 ± 0.0919 "
          "| -0.0350 ± 0.0212 (n=2) |") in text
  assert "| AdamW | 1 | 0.1 | 0.01 | 0 | 2 | 1.5500 ± 0.0707 | – |" in text
  assert "`lr_multipliers=query=1.4`" in text
  # Its uniform control (every kind at one multiplier): a row of its own.
  finals += [dict(_run("adamw", 1e-2, 1.52, 0, 1000), lr_multipliers="fc1=1.2,query=1.2")]
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  text = report.render(str(tmp_path))
  assert f"| {report.UNIFORM_LABEL} | 1 | 0.1 | 0.01 | 0 | 1 | 1.5200 | +0.0200 (n=1) |" in text
  assert f"| {report.MATCHED_LABEL} | 1 | 0.1 | 0.01 | 0 | 2 |" in text
  assert "`lr_multipliers=fc1=1.2,query=1.2` (the matched multipliers' root mean" in text


def test_the_longer_schedule_table_gives_the_gap_at_every_evaluation(tmp_path):
  runs = [dict(_run(m, 3e-3, None, seed, 3000), architecture="gpt",
               curve=[[100, 2.5 + seed - 0.1 * (m == "enorm")], [200, 2.0 + seed - d]])
          for seed in (0, 1) for m, d in (("adamw", 0.0), ("enorm", 0.02))]
  (tmp_path / sweep.LONG_FILE).write_text(json.dumps(runs))
  text = report.render(str(tmp_path))
  assert "### Longer schedule: GPT-style (LayerNorm, ReLU MLP), 3000 steps" in text
  assert "| 100 | 3.0000 | 2.9000 | -0.1000, -0.1000 |" in text
  assert "| 200 | 2.5000 | 2.4800 | -0.0200, -0.0200 |" in text
  assert (tmp_path / "tinyshakespeare_long.png").stat().st_size > 0
  assert not report.long_figure(runs[:1], tmp_path / "none.png")  # AdamW alone: no pair
  assert not (tmp_path / "none.png").exists()


def test_adamw_at_enorm_rate_is_paired_with_plain_adamw_at_that_rate(tmp_path):
  llama = lambda method, lr, loss, seed, **kw: dict(_run(method, lr, loss, seed, 1000),
                                                   architecture="llama", **kw)
  finals = [llama("adamw", 1e-2, 1.47, s) for s in (0, 1)]  # AdamW at its own rate
  finals += [llama("enorm", 3e-3, loss, s) for s, loss in ((0, 1.48), (1, 1.49))]
  at_rate = [llama("adamw", 3e-3, loss, s) for s, loss in ((0, 1.50), (1, 1.52))]
  at_rate += [llama("adamw", 3e-3, loss, s, lr_multipliers="query=1.4,up=1.2")
              for s, loss in ((0, 1.49), (1, 1.50))]
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  assert "AdamW at ENorm's rate" not in report.render(str(tmp_path))
  (tmp_path / sweep.AT_ENORM_RATE_FILE).write_text(json.dumps(at_rate))
  section = report.render(str(tmp_path)).split("AdamW at ENorm's rate")[1]
  assert "| AdamW | 1 | 0.1 | 0.003 | 0 | 2 | 1.5100 ± 0.0141 | – |" in section
  assert "| ENorm(AdamW), all groups | 1 | 0.1 | 0.003 | 64 | 2 | 1.4850 ± 0.0071 " \
      "| -0.0250 ± 0.0071 (n=2) |" in section
  assert (f"| {report.MATCHED_LABEL} | 1 | 0.1 | 0.003 | 0 | 2 | 1.4950 ± 0.0071 "
          "| -0.0150 ± 0.0071 (n=2) |") in section
  assert "0.01 |" not in section.split("### Longer")[0]  # AdamW at its own rate left out
