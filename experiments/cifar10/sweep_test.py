"""The sweep's cell logic: priorities, GN coordinate search, finals after search."""

import json

from absl import flags

from experiments.cifar10 import sweep
from experiments.cifar10.configs import conv, conv_table2, fc
from experiments.common import sweeps


def _record(cell, val_acc):
  return dict(cell, batch_size=256, momentum=0.0, seed=0, width_multiplier=None,
              val_acc=val_acc)


def _write(tmp_path, records):
  (tmp_path / "cifar10_fc_search.json").write_text(json.dumps(records))


def test_fc_search_cells_and_gn_coordinate_search(tmp_path):
  flags.FLAGS(["sweep_test"])
  cells = sweep.fc_cells("search", str(tmp_path))
  gn15 = [c for c in cells if c["method"] == "gn" and c["depth"] == 15]
  assert len(gn15) == len(sweep.SEARCH_LRS)  # provisional: depth 3 not searched yet
  assert {c["depth"] for c in cells[:12]} == {15}  # the main methods at depth 15 come first
  assert {c["lr"] for c in cells if c["method"] == "path_sgd"} == set(sweep.PATH_SGD_LRS)
  assert {c["lr"] for c in cells if c["method"] == "enorm"} == set(sweep.SEARCH_LRS)
  # Depth-3 GN picks 20 groups; depth 15 then searches rates at 20 groups ...
  gn3 = [_record(c, 0.5 if c["gn_groups"] == 20 and c["lr"] == 0.05 else 0.3)
         for c in cells if c["method"] == "gn" and c["depth"] == 3]
  _write(tmp_path, gn3)
  gn15 = [c for c in sweep.fc_cells("search", str(tmp_path))
          if c["method"] == "gn" and c["depth"] == 15]
  assert {c["gn_groups"] for c in gn15} == {20}
  # ... and, once they are done, the other group counts at the chosen rate.
  _write(tmp_path, gn3 + [_record(c, 0.4 if c["lr"] == 0.1 else 0.2) for c in gn15])
  gn15 = [c for c in sweep.fc_cells("search", str(tmp_path))
          if c["method"] == "gn" and c["depth"] == 15]
  extra = [c for c in gn15 if c["gn_groups"] != 20]
  assert {c["gn_groups"] for c in extra} == set(fc.GN_GROUPS) - {20}
  assert {c["lr"] for c in extra} == {0.1}


def test_final_cells_wait_for_a_complete_search(tmp_path):
  flags.FLAGS(["sweep_test"])
  search = [c for c in sweep.fc_cells("search", str(tmp_path))
            if (c["method"], c["c"], c["depth"]) == ("enorm", 1.2, 3)]
  _write(tmp_path, [_record(c, c["lr"]) for c in search[:-1]])
  assert not sweep.fc_cells("final", str(tmp_path))
  _write(tmp_path, [_record(c, 0.1 if c["lr"] == 0.01 else 0.05) for c in search])
  finals = sweep.fc_cells("final", str(tmp_path))
  assert [f["seed"] for f in finals] == list(fc.SEEDS)  # a main block: every seed
  for final in finals:
    assert (final["method"], final["c"], final["depth"], final["lr"], final["epochs"]) == (
        "enorm", 1.2, 3, 0.01, 60)
  todo = sweep.pending_cells("fc", str(tmp_path))
  assert todo[0][1].endswith("cifar10_fc_search.json")
  assert any(path.endswith("cifar10_fc.json") for _, path in todo)


def test_rate_check_runs_the_second_best_search_rate_of_every_seed(tmp_path):
  flags.FLAGS(["sweep_test"])
  depth, pairs = sweep.FC_RATE_CHECKS[0]
  method, c = pairs[0]
  search = [x for x in sweep.fc_cells("search", str(tmp_path))
            if (x["method"], x["c"], x["depth"]) == (method, c, depth)]
  scores = dict(zip(sweep.SEARCH_LRS, (0.3, 0.5, 0.4)))  # best 2nd rate, runner-up 3rd
  _write(tmp_path, [_record(x, scores[x["lr"]]) for x in search[:-1]])
  assert not [x for x in sweep.fc_cells("final", str(tmp_path))  # search unfinished
              if x["stage"] == "rate_check"]
  _write(tmp_path, [_record(x, scores[x["lr"]]) for x in search])
  todo = [(cell, path) for cell, path in sweep.pending_cells("fc", str(tmp_path))
          if path.endswith("cifar10_fc_rate_check.json")]
  assert [(x["method"], x["c"], x["depth"], x["lr"], x["epochs"], x["seed"])
          for x, _ in todo] == [(method, c, depth, sweep.SEARCH_LRS[2], 60, s)
                                for s in fc.SEEDS]


def test_parallel_workers_skip_claimed_cells(tmp_path, monkeypatch):
  flags.FLAGS(["sweep_test", f"--workdir_root={tmp_path / 'work'}"])
  ran = []

  def fake_run_cell(sweep_name, cell, results, commit):
    ran.append(sweep.cell_name(sweep.make_record(sweep_name, cell)))
    sweeps.append_result(results, dict(sweep.make_record(sweep_name, cell), val_acc=0.5,
                                      commit=commit))

  monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
  results_dir = str(tmp_path)
  (first, path), (second, _) = sweep.pending_cells("conv_reduced", results_dir)[:2]
  # Another worker holds the first cell: this one takes the second.
  with sweeps.locked(f"{sweep.cell_workdir('conv_reduced', first, path)}/.claim"):
    assert sweep.run_next_free_cell("conv_reduced", results_dir, "abc")
  assert ran == [sweep.cell_name(sweep.make_record("conv_reduced", second))]
  # The claim is released with its holder, so the first cell is free again.
  assert sweep.run_next_free_cell("conv_reduced", results_dir, "abc")
  assert ran[-1] == sweep.cell_name(sweep.make_record("conv_reduced", first))
  done = sweeps.read_results(path)
  assert len(done) == 2 and {r["commit"] for r in done} == {"abc"}
  assert len(sweep.pending_cells("conv_reduced", results_dir)) == len(sweep.conv_cells(results_dir)) - 2


def test_conv_gn_group_search_then_reruns_with_the_chosen_count(tmp_path):
  flags.FLAGS(["sweep_test"])
  cells = sweep.conv_cells(str(tmp_path))
  search = [c for c in cells if c["method"] == "gn" and c["batch_size"] == 32
            and c["momentum"] == 0.0]
  assert sorted(c["gn_groups"] for c in search) == sorted(conv.GN_GROUPS)
  late = [c for c in cells if c["lr"] == sweep.CONV_MOMENTUM_LR]
  assert {c["gn_groups"] for c in late if c["method"] == "gn"} == {sweep.CONV_GN_GROUPS}
  # 8 groups win the search: GN's other settings run again with 8 groups.
  records = [dict(c, depth=None, seed=0, use_bias=True, val_acc=0.7 if c["gn_groups"] == 8 else 0.6)
             for c in search]
  (tmp_path / "cifar10_conv.json").write_text(json.dumps(records))
  cells = sweep.conv_cells(str(tmp_path))
  reruns = [c for c in cells if c["method"] == "gn" and c["gn_groups"] == 8
            and c["lr"] == sweep.CONV_LR and c not in search]
  assert len(reruns) == len(sweep.CONV_BATCH_SIZES) * len(conv.MOMENTUMS) - 1
  late = [c for c in cells if c["lr"] == sweep.CONV_MOMENTUM_LR and c["method"] == "gn"]
  assert {c["gn_groups"] for c in late} == {8}


def test_conv_no_bias_cells_train_without_biases(tmp_path):
  flags.FLAGS(["sweep_test"])
  todo = sweep.pending_cells("conv_no_bias", str(tmp_path))
  assert len(todo) == len(sweep.CONV_NO_BIAS_SETTINGS) * len(sweep.CONV_NO_BIAS_METHODS)
  for cell, path in todo:
    assert path.endswith("cifar10_conv.json")
    assert sweep.make_config("conv_no_bias", cell, "").use_bias is False
    assert sweep.make_record("conv_no_bias", cell)["use_bias"] is False
  # The same settings with biases are other cells.
  assert sweep.conv_cells(str(tmp_path))[0]["method"] == "baseline"
  assert sweep.make_record("conv_reduced", dict(sweep.conv_cells(str(tmp_path))[0], seed=0))[
      "use_bias"] is True


def test_enorm_impl_searches_its_weight_with_the_rate_and_runs_finals_at_the_pair(tmp_path):
  flags.FLAGS(["sweep_test"])
  depth = sweep.IMPL_SEARCH_DEPTHS[0]
  search = [x for x in sweep.fc_cells("search", str(tmp_path))
            if (x["method"], x["depth"]) == ("enorm_impl", depth)]
  assert {(x["lr"], x["impl_lambda"]) for x in search} == {
      (lr, lam) for lr in sweep.SEARCH_LRS for lam in sweep.IMPL_LAMBDAS}
  other = [x for x in sweep.fc_cells("search", str(tmp_path))
           if x["method"] == "enorm_impl" and x["depth"] not in sweep.IMPL_SEARCH_DEPTHS]
  assert other and {x["impl_lambda"] for x in other} == {fc.get_config().impl_lambda}
  best = (0.05, 1e-2)
  records = [_record(x, 0.5 if (x["lr"], x["impl_lambda"]) == best else 0.3) for x in search]
  _write(tmp_path, records[:-1])
  assert not [x for x in sweep.fc_cells("final", str(tmp_path))
              if (x["method"], x["depth"]) == ("enorm_impl", depth)]
  _write(tmp_path, records)
  finals = [x for x in sweep.fc_cells("final", str(tmp_path))
            if (x["method"], x["depth"]) == ("enorm_impl", depth)]
  assert [(x["lr"], x["impl_lambda"], x["seed"]) for x in finals] == [
      (*best, s) for s in fc.SEEDS]
  config = sweep.make_config("fc", finals[0], "")
  assert (config.learning_rate, config.impl_lambda) == best
  # Runs at two weights are two cells, also in the results' keys.
  keys = {sweep.cell_key(sweep.make_record("fc", dict(x, seed=0))) for x in search}
  assert len(keys) == len(search)


def test_table2_searches_every_rate_then_runs_every_seed_at_the_best(tmp_path):
  flags.FLAGS(["sweep_test"])
  todo = sweep.pending_cells("conv_table2", str(tmp_path))
  assert len(todo) == len(conv_table2.METHODS) * len(conv_table2.LEARNING_RATES)
  assert all(p.endswith("cifar10_conv_table2_search.json") for _, p in todo)
  config = sweep.make_config("conv_table2", todo[0][0], "")
  assert (config.model, config.batch_size, config.momentum, config.num_epochs) == (
      "cifar_nv", 32, 0.0, conv_table2.SEARCH_EPOCHS)
  # Every rate of the Baseline is searched, 0.05 wins: its seeds run at 0.05.
  search = [dict(sweep.make_record("conv_table2", c), val_acc=0.6 if c["lr"] == 0.05 else 0.5)
            for c, _ in todo if c["method"] == "baseline"]
  (tmp_path / "cifar10_conv_table2_search.json").write_text(json.dumps(search[:-1]))
  assert not any(p.endswith("cifar10_conv_table2.json")
                 for _, p in sweep.pending_cells("conv_table2", str(tmp_path)))
  (tmp_path / "cifar10_conv_table2_search.json").write_text(json.dumps(search))
  finals = [c for c, p in sweep.pending_cells("conv_table2", str(tmp_path))
            if p.endswith("cifar10_conv_table2.json")]
  assert [(c["method"], c["lr"], c["seed"], c["epochs"]) for c in finals] == [
      ("baseline", 0.05, s, conv_table2.get_config().num_epochs) for s in conv_table2.SEEDS]


def _write_log(workdir, rows):
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_epoch_curve_averages_the_training_windows_between_evaluations(tmp_path):
  def train(step, loss, acc):
    return dict(step=step, train_loss=loss, train_accuracy=acc)
  _write_log(tmp_path / "run", [
      train(2, 3.0, 0.1), train(4, 1.0, 0.3), dict(step=4, validation_acc=0.4, epoch=1.0),
      train(6, 9.0, 0.9),  # a window the killed run logged, then redone on resuming
      train(6, 0.5, 0.5), train(8, 0.25, 0.7), dict(step=8, validation_acc=0.6, epoch=2.0)])
  assert sweep.epoch_curve(str(tmp_path / "run")) == [[4, 0.4, 2.0, 0.2],
                                                      [8, 0.6, 0.375, 0.6]]
  assert sweep.epoch_curve(str(tmp_path / "missing")) == []


def test_add_curves_fills_in_the_records_whose_workdir_has_a_log(tmp_path):
  flags.FLAGS(["sweep_test", f"--workdir_root={tmp_path / 'work'}"])
  (cell, path), (other, _) = sweep.pending_cells("conv_table2", str(tmp_path))[:2]
  records = [dict(sweep.make_record("conv_table2", c), val_acc=0.5) for c in (cell, other)]
  sweeps.update_results(path, lambda _: records)
  _write_log(tmp_path / "work" / "cifar10_conv_table2_search"
             / sweep.cell_name(records[0]),
             [dict(step=5, train_loss=1.5, train_accuracy=0.25),
              dict(step=5, validation_acc=0.5, epoch=1.0)])
  assert sweep.add_curves("conv_table2", str(tmp_path)) == 1
  first, second = sweeps.read_results(path)
  assert first["curve"] == [[5, 0.5, 1.5, 0.25]] and "curve" not in second
  assert sweep.add_curves("conv_table2", str(tmp_path)) == 0  # the curve is kept
