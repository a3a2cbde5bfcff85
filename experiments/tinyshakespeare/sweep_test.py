"""The tiny-Shakespeare sweep: search first, finals at the best rate, real records."""

import json

import pytest
from absl import flags

from experiments.common import sweeps
from experiments.tinyshakespeare import sweep
from experiments.tinyshakespeare.train_test import data_dir, tiny_config  # noqa: F401


def test_finals_wait_for_the_search_and_take_the_best_finite_rate(tmp_path):
  flags.FLAGS(["sweep_test"])
  search = [c for c, name in sweep.all_cells(str(tmp_path))
            if name == sweep.SEARCH_FILE and c["architecture"] == "gpt"]
  assert len(search) == len(sweep.METHODS) * len(sweep.SEARCH_LRS)
  assert all(name == sweep.SEARCH_FILE for _, name in sweep.all_cells(str(tmp_path)))
  loss = {1e-3: 2.0, 3e-3: 1.8, 1e-2: None, 3e-2: 2.5}  # 1e-2 diverged
  records = [dict(c, val_loss=loss[c["lr"]]) for c in search if c["method"] == "enorm"]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(records[:-1]))
  assert not [c for c, name in sweep.all_cells(str(tmp_path)) if name == sweep.FINAL_FILE]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(records))
  finals = [c for c, name in sweep.all_cells(str(tmp_path)) if name == sweep.FINAL_FILE]
  assert [(c["method"], c["lr"], c["seed"], c["weight_decay"], c["c"]) for c in finals] == [
      ("enorm", 3e-3, s, 0.1, 1.0) for s in sweep.SEEDS] + [
      ("enorm", 3e-3, s, 0.0, 1.0) for s in sweep.SEEDS] + [
      ("enorm", 3e-3, 0, 0.1, sweep.CONTROL_C)]
  # Records made before the architecture and weight-decay fields count as GPT's,
  # with the default weight decay.
  old = [{k: v for k, v in r.items() if k not in ("architecture", "weight_decay")}
         for r in records]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(old))
  assert [c for c, name in sweep.all_cells(str(tmp_path)) if name == sweep.FINAL_FILE] == finals
  assert finals[0]["num_steps"] == sweep.default.get_config().num_steps
  config = sweep.make_config(search[0], "")
  assert (config.num_steps, config.warmup_steps) == (sweep.SEARCH_STEPS, 30)


def test_the_matched_rate_control_waits_for_the_dynamics_run(tmp_path):
  flags.FLAGS(["sweep_test"])
  search = [dict(architecture="gpt", method="adamw", c=1.0, weight_decay=0.1, lr=lr, seed=0,
                 num_steps=sweep.SEARCH_STEPS, val_loss=loss)
            for lr, loss in zip(sweep.SEARCH_LRS, (2.0, 1.9, 1.8, 2.1))]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(search))
  matched = lambda: [c for c, _ in sweep.all_cells(str(tmp_path)) if c.get("lr_multipliers")]
  assert not matched()
  steps = [1, 50, 100]
  dynamics = {m: {"step": steps, "relative_step": [{"query": q, "fc1": 1.0}] * 3}
              for m, q in (("adamw", 1.0), ("enorm", 1.5))}
  dynamics["config"] = {"learning_rate": 1e-2}  # AdamW's searched rate
  (tmp_path / sweep.DYNAMICS_FILE.format("gpt")).write_text(json.dumps(dynamics))
  # The matched rates, then their uniform control: sqrt((4 * 1.5^2 + 16 * 1^2) / 20)
  # with fc1 four times query's parameter count.
  assert [(c["method"], c["lr"], c["seed"], c["lr_multipliers"]) for c in matched()] == [
      ("adamw", 1e-2, s, "fc1=1.00,query=1.50") for s in sweep.SEEDS] + [
      ("adamw", 1e-2, s, "fc1=1.12,query=1.12") for s in sweep.SEEDS]
  assert not sweep.is_main(matched()[0], "gpt")
  assert sweep.make_config(matched()[0], "").lr_multipliers == "fc1=1.00,query=1.50"
  # Cells without multipliers keep the folder names they had before the field existed.
  assert "lr_multipliers" not in sweep.cell_workdir(search[0], sweep.SEARCH_FILE)
  assert "lr_multipliers=fc1=1.00" in sweep.cell_workdir(matched()[0], sweep.FINAL_FILE)
  assert not [c for c, f in sweep.all_cells(str(tmp_path)) if f == sweep.AT_ENORM_RATE_FILE]
  # Ratios measured at another rate: AdamW at that rate too, plain and matched, seed by
  # seed, in their own file (so they never count as the main runs at AdamW's rate).
  dynamics["config"] = {"learning_rate": 3e-3}
  (tmp_path / sweep.DYNAMICS_FILE.format("gpt")).write_text(json.dumps(dynamics))
  at_rate = [(c["lr"], c["seed"], c.get("lr_multipliers", "")) for c, f
             in sweep.all_cells(str(tmp_path)) if f == sweep.AT_ENORM_RATE_FILE]
  assert at_rate == [(3e-3, s, m) for s in sweep.SEEDS for m in ("", "fc1=1.00,query=1.50")]
  assert len(matched()) == 2 * len(sweep.SEEDS) + len(sweep.SEEDS)


def test_the_longer_schedule_waits_for_every_full_run_and_takes_the_largest_gain(tmp_path):
  flags.FLAGS(["sweep_test"])
  search = [dict(architecture=a, method=m, c=1.0, weight_decay=0.1, lr=lr, seed=0,
                 num_steps=sweep.SEARCH_STEPS, val_loss=2.0 if lr == 3e-3 else 2.5)
            for a in sweep.ARCHITECTURES for m in sweep.METHODS for lr in sweep.SEARCH_LRS]
  (tmp_path / sweep.SEARCH_FILE).write_text(json.dumps(search))
  gain = {("gpt", "enorm"): 0.03, ("gpt", "enorm_mlp"): 0.01, ("gpt", "enorm_attn"): 0.02,
          ("llama", "enorm"): 0.01, ("llama", "enorm_mlp"): 0.0, ("llama", "enorm_attn"): 0.0}
  finals = [dict(r, num_steps=1000, seed=seed, val_loss=1.6 - gain.get((r["architecture"],
                                                                       r["method"]), 0))
            for r in search if r["lr"] == 3e-3 for seed in sweep.SEEDS]
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals[:-1]))
  long = lambda: [c for c, name in sweep.all_cells(str(tmp_path)) if name == sweep.LONG_FILE]
  assert not long()  # one Llama seed missing
  (tmp_path / sweep.FINAL_FILE).write_text(json.dumps(finals))
  assert [(c["architecture"], c["method"], c["seed"], c["num_steps"]) for c in long()] == [
      ("gpt", m, s, sweep.LONG_STEPS) for s in sweep.LONG_SEEDS for m in ("adamw", "enorm")]
  config = sweep.make_config(long()[0], "")
  assert (config.num_steps, config.warmup_steps) == (sweep.LONG_STEPS, 300)
  # The learning-rate controls come after the longer schedule.
  dynamics = {m: {"step": [1, 50, 100], "relative_step": [{"query": 1.0}] * 3}
              for m in ("adamw", "enorm")}
  dynamics["config"] = {"learning_rate": 3e-3}
  (tmp_path / sweep.DYNAMICS_FILE.format("llama")).write_text(json.dumps(dynamics))
  names = [(name, bool(c.get("lr_multipliers"))) for c, name in sweep.all_cells(str(tmp_path))]
  assert names.index((sweep.LONG_FILE, False)) < names.index((sweep.FINAL_FILE, True))
  assert names[-1] == (sweep.FINAL_FILE, True)


@pytest.mark.slow
def test_a_whole_sweep_on_generated_text(tmp_path, monkeypatch, data_dir):  # noqa: F811
  flags.FLAGS(["sweep_test", f"--workdir_root={tmp_path / 'work'}", f"--data_dir={data_dir}"])
  monkeypatch.setattr(sweep, "METHODS", ("adamw", "enorm_mlp"))
  monkeypatch.setattr(sweep, "ARCHITECTURES", ("gpt",))
  monkeypatch.setattr(sweep, "SEARCH_LRS", (1e-3, 1e-2))
  monkeypatch.setattr(sweep, "SEARCH_STEPS", 3)
  monkeypatch.setattr(sweep, "SEEDS", (0, 1))
  tiny = tiny_config("", "adamw")
  monkeypatch.setattr(sweep.default, "get_config", tiny.copy_and_resolve_references)
  results = str(tmp_path)
  ran = 0
  while sweeps.run_next_free_cell(lambda: sweep.pending_cells(results), sweep.cell_workdir,
                                  lambda cell, path: sweep.run_cell(cell, path, "abc")):
    ran += 1
  assert ran == 2 * 2 + 2 * 2 + 2  # search, finals, AdamW without weight decay
  search = sweeps.read_results(f"{results}/{sweep.SEARCH_FILE}")
  finals = sweeps.read_results(f"{results}/{sweep.FINAL_FILE}")
  assert len(search) == 4 and len(finals) == 6
  for r in search:
    assert [step for step, _ in r["curve"]] == [3] and r["curve"][-1][1] == r["val_loss"]
  for r in finals:
    assert [step for step, _ in r["curve"]] == [3, 6] and r["curve"][-1][1] == r["val_loss"]
    assert r["lr"] == sweep.best_rate(search, r["method"]) and r["commit"] == "abc"
  assert {r["rescaled_units"] for r in finals if r["method"] == "enorm_mlp"} == {2 * 32}
