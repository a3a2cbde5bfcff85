"""Table 2's report: the search, the finals paired by seed, the per-epoch curves."""

import json
import pathlib

from experiments.cifar10 import table2


def test_table_pairs_each_method_with_the_baseline_seed_by_seed():
  def run(method, c, lr, seed, acc):
    return dict(method=method, c=c, lr=lr, seed=seed, val_acc=acc)
  search = [run("baseline", 1.0, lr, 0, a) for lr, a in ((0.01, 0.5), (0.05, 0.6), (0.1, 0.55))]
  search += [run("enorm", 1.2, 0.05, 0, 0.61), run("enorm", 1.2, 0.1, 0, None)]
  finals = [run("baseline", 1.0, 0.05, s, a) for s, a in ((0, 0.70), (1, 0.72), (2, 0.74))]
  finals += [run("enorm", 1.2, 0.05, s, a) for s, a in ((0, 0.71), (1, 0.74), (2, None))]
  table = table2.table(search, finals)
  assert "| Baseline | 50.00 / 60.00 / 55.00 | 0.05 | 72.00 ± 2.00 |  | 0,1,2 |" in table
  # Paired: +1 and +2 points on seeds 0 and 1; seed 2 diverged.
  assert "| ENorm-1.2 | – / 61.00 / div. | 0.05 | 72.50 ± 2.12 | +1.50 ± 0.71 | 0,1 (1 diverged) |" \
      in table
  assert "| GN | – / – / – | – | – |  |  |" in table
  assert "* ENorm-1 − Baseline: paper +0.8 points; here not yet run." in table
  finals += [run("bn", 1.0, 0.1, s, a) for s, a in ((0, 0.70), (2, 0.75))]
  # ENorm-1.2 - BN on the seeds both finished: seed 0 only (+1 point).
  assert "* ENorm-1.2 − BN: paper within 0.1 points; here +1.00 (seeds 0)." \
      in table2.table(search, finals)


def test_committed_table_matches_its_results():
  """`cifar10_conv_table2.md` is the table and the per-epoch curves the report
  computes from the committed search and final results (so a results commit cannot
  leave them stale)."""
  results = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results"
  search = json.loads((results / "cifar10_conv_table2_search.json").read_text())
  finals_path = results / "cifar10_conv_table2.json"
  finals = json.loads(finals_path.read_text()) if finals_path.exists() else []
  committed = (results / "cifar10_conv_table2.md").read_text()
  by_epoch = table2.epoch_table(finals)
  assert committed.startswith(table2.table(search, finals) + ("\n" + by_epoch if by_epoch else ""))


def test_epoch_table_averages_seeds_and_pairs_the_claims_epoch_by_epoch(tmp_path):
  def run(method, c, seed, accs, losses=(1.0, 0.5)):
    curve = [[100 * (i + 1), a, l, 0.5] for i, (a, l) in enumerate(zip(accs, losses))]
    return dict(method=method, c=c, lr=0.1, seed=seed, val_acc=accs[-1], curve=curve)
  finals = [run("bn", 1.0, 1, (0.5, 0.7)), run("bn", 1.0, 2, (0.6, 0.8), (1.0, 0.7)),
            run("enorm", 1.2, 1, (0.4, 0.68)), run("enorm", 1.2, 2, (0.5, 0.78)),
            dict(run("baseline", 1.0, 0, (0.5, 0.6)), curve=None)]  # a run without its log
  text = table2.epoch_table(finals)
  assert "| BN | 1,2 | 55.0 / 75.0 | 0.600 ± 0.141 | 50.00 ± 0.00 |" in text
  assert "| ENorm-1.2 | 1,2 | 45.0 / 73.0 |" in text
  assert "Baseline" not in text.split("\n\n")[1]  # the table
  assert "* ENorm-1.2 − BN by epoch (seeds 1,2): -10.0 / -2.0 points." in text
  assert "ENorm-1 − Baseline by epoch" not in text
  assert table2.epoch_table(finals[-1:]) == ""
  table2.figure(finals, tmp_path / "t2.png")
  assert (tmp_path / "t2.png").stat().st_size > 0
