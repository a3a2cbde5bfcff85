"""The report renders tables and figures from result records."""

import json
import pathlib

from experiments.cifar10 import report
from experiments.common import reports


def _record(method, c, acc, **kw):
  return dict(method=method, c=c, lr=0.05, epochs=4, seed=0, val_acc=acc, test_acc=None, **kw)


def test_fc_table_picks_the_best_learning_rate_per_cell(tmp_path):
  records = [_record("enorm", 1.0, 0.5, depth=3), _record("enorm", 1.0, 0.6, depth=3, x=1),
             _record("baseline", 1.0, None, depth=3), _record("baseline", 1.0, 0.4, depth=15)]
  records[1]["lr"] = 0.1
  table, best = report.fc_table(records, "t")
  assert best[("ENorm-1", 3)]["lr"] == 0.1
  assert "| ENorm-1 | 60.00 (lr 0.1) | – |" in table
  # Several seeds: mean ± sample standard deviation, and diverged seeds counted.
  seeds = [dict(_record("bn", 1.0, acc, depth=3), seed=i)
           for i, acc in enumerate((0.5, 0.6, None))]
  seeds_table, _ = report.fc_table(seeds, "t")
  assert "| BN | 55.00 ± 7.07 (lr 0.05, 2 seeds, 1 diverged) |" in seeds_table
  # A cell whose only run diverged says so; the diverged run is never "best".
  assert "| Baseline | diverged (lr 0.05) | 40.00 (lr 0.05) |" in table
  assert ("Baseline", 3) not in best
  report.fc_figure(best, tmp_path / "fc.png", "t")
  assert (tmp_path / "fc.png").stat().st_size > 0


def test_conv_table_and_figure(tmp_path):
  records = [_record("bn", 1.0, 0.7, batch_size=128, momentum=0.9, width_multiplier=0.25),
             _record("enorm", 1.2, 0.65, batch_size=8, momentum=0.0, width_multiplier=0.25)]
  table, best = report.conv_table(json.loads(json.dumps(records)))
  assert "width x0.25, 4 epochs, lr 0.05; runs finished: 2" in table
  assert "| BN | – | 70.00 (lr 0.05) |" in table
  assert "| ENorm-1.2 | 65.00 (lr 0.05) | – |" in table
  report.conv_figure(best, tmp_path / "conv.png")
  assert (tmp_path / "conv.png").stat().st_size > 0


def test_render_writes_every_table_and_figure(tmp_path):
  fc = [_record("enorm", 1.0, 0.5, depth=3, batch_size=256, momentum=0.0)]
  conv = [_record("gn", 1.0, 0.6, batch_size=32, momentum=0.0, width_multiplier=0.25)]
  (tmp_path / "cifar10_fc.json").write_text(json.dumps(fc))
  (tmp_path / "cifar10_conv.json").write_text(json.dumps(conv))
  report.render(str(tmp_path))
  for name in ("cifar10_fc.md", "cifar10_fc.png", "cifar10_conv.md", "cifar10_conv.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_conv_bias_table_pairs_each_run_without_biases_with_its_biased_cell(tmp_path):
  setting = dict(batch_size=8, momentum=0.9, width_multiplier=0.25)
  records = [_record("enorm", 1.0, None, **setting), _record("baseline", 1.0, 0.6, **setting),
             _record("enorm", 1.0, 0.55, use_bias=False, **setting),
             _record("baseline", 1.0, 0.58, use_bias=False, **setting),
             _record("enorm", 1.2, 0.5, use_bias=False, **setting),
             dict(_record("baseline", 1.0, 0.7, **setting), seed=1)]  # other seed: no pair
  table = report.conv_bias_table(records)
  assert "| 8 | 0.9 | 0.05 | Baseline | 60.00 | 58.00 | -2.00 |" in table
  assert "| 8 | 0.9 | 0.05 | ENorm-1 | diverged | 55.00 |  |" in table
  assert "| 8 | 0.9 | 0.05 | ENorm-1.2 | not run | 50.00 |  |" in table
  assert table.index("Baseline") < table.index("ENorm-1 ") < table.index("ENorm-1.2")
  (tmp_path / "cifar10_conv.json").write_text(json.dumps(records))
  report.render(str(tmp_path))
  assert (tmp_path / "cifar10_conv_no_bias.md").read_text().startswith(table)
  assert "ENorm-1.2 | 50" not in (tmp_path / "cifar10_conv.md").read_text()


def _markdown_rows(text, header):
  """The body rows of the markdown table whose header line starts with ``header``."""
  if header not in text:
    return []
  lines = text[text.index(header):].splitlines()[2:]
  rows = []
  for line in lines:
    if not line.startswith("|"):
      return rows
    rows.append([cell.strip().strip("*") for cell in line.strip("|").split("|")])
  return rows


def test_readme_fc_tables_match_the_committed_results():
  """The FC tables written by hand in docs/results.md and the results README state exactly
  the mean ± std that the report computes from `cifar10_fc.json` over the seeds that
  each row's seeds column names ("0" or "0-2")."""
  root = pathlib.Path(__file__).resolve().parents[2]
  results = root / "experiments" / "results"
  records = json.loads((results / "cifar10_fc.json").read_text())
  for methods in (("Baseline", "BN", "ENorm-1", "ENorm-1.2"),
                  ("Baseline", "BN", "GN", "ENorm-1.2", "ENorm-Impl", "Path-SGD")):
    header = "| depth | " + " | ".join(methods) + " |"
    for path, decimals in ((root / "docs" / "results.md", 1), (results / "README.md", 2)):
      rows = _markdown_rows(path.read_text(), header)
      assert rows, f"{path}: no table {header}"
      for row in rows:
        first, *last = map(int, row[-1].split("-"))
        seeds = set(range(first, (last[0] if last else first) + 1))
        summary = report.seed_summaries([r for r in records if r["seed"] in seeds],
                                        lambda r: (reports.method_label(r), r["depth"]))
        depth = int(row[0])
        for method, cell in zip(methods, row[1:]):
          s = summary[(method, depth)]
          assert s["seeds"] == len(seeds), (path.name, method, depth, s["seeds"])
          expected = f"{100 * s['val_acc']:.{decimals}f}"
          if s["std"] is not None:
            expected += f" ± {100 * s['std']:.{decimals}f}"
          assert cell.split(" (")[0] == expected, (path.name, method, depth, cell)


def test_figure8_table_pairs_each_method_with_enorm_at_its_best_setting():
  def run(method, depth, lr, seed, acc, **kw):
    return dict(method=method, c=1.2 if method == "enorm" else 1.0, depth=depth, lr=lr,
                seed=seed, val_acc=acc, **kw)
  records = [run("enorm", 3, 0.1, s, a) for s, a in ((0, 0.55), (1, 0.56), (2, 0.57))]
  records += [run("gn", 3, 0.1, s, a, gn_groups=5) for s, a in ((0, 0.54), (1, 0.54))]
  records += [run("gn", 3, 0.1, 0, 0.30, gn_groups=50)]  # a worse setting: not shown
  records += [run("path_sgd", 3, 0.01, s, a) for s, a in ((0, 0.53), (1, None), (2, 0.55))]
  records += [run("baseline", 1, 0.1, 0, 0.5)]  # no Figure 8 method at depth 1
  table = report.figure8_table(records)
  assert "| method | depth 3 |" in table
  assert "| GN | -1.50 ± 0.71 (0,1) |" in table
  assert "| Path-SGD | -2.00 ± 0.00 (0,2) |" in table
  assert "| ENorm-Impl | – |" in table
  assert report.figure8_table(records[:3]) == ""
