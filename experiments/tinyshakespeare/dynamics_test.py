"""The dynamics measurements on a generated text."""

import numpy as np
import pytest

from experiments.tinyshakespeare import dynamics, input_pipeline, train
from experiments.tinyshakespeare.train_test import data_dir, tiny_config  # noqa: F401


def test_weight_kinds_and_group_families():
  assert train.weight_kind("block0_attn/query/kernel") == "query"
  assert train.weight_kind("layers/up/kernel") == "up"
  assert train.weight_kind("block3_mlp_norm/scale") == "mlp_norm"
  assert train.weight_kind("block0_attn/query/bias") is None
  assert train.weight_kind("head/kernel") is None
  assert dynamics.group_family("'block1_attn/value outputs'") == "value/out"
  assert dynamics.group_family("'layers/mlp_norm outputs'") == "norm gains"
  assert dynamics.group_family("'layers/up outputs'") == "mlp"


@pytest.mark.slow  # ~30 s: two short trainings; the pure parts are tested above
@pytest.mark.parametrize("architecture", ["gpt", "llama"])
def test_enorm_balances_paired_kernels_and_records_its_factors(data_dir, architecture):  # noqa: F811
  config = tiny_config(data_dir, "adamw", architecture=architecture, num_steps=4)
  corpus = input_pipeline.make_corpus(input_pipeline.read_text(data_dir), 0.1)
  out = {m: dynamics.run(m, corpus, config, every=2) for m in dynamics.METHODS}
  assert out["enorm"]["step"] == [1, 2, 4]
  energy = out["enorm"]["energy"][0]
  # After a cycle, each unit's incoming and outgoing norms agree, so the value and
  # output kernels' energies do too (their only group is the value/out one).
  np.testing.assert_allclose(energy["value"], energy["out"], rtol=1e-3)
  assert set(out["enorm"]["log_factor"][-1]) == {"norm gains", "query/key", "value/out", "mlp"}
  assert out["adamw"]["log_factor"][-1] == {}
  for method in dynamics.METHODS:
    assert np.isfinite(out[method]["validation_loss"])
    assert all(0 < s < 1 for s in out[method]["relative_step"][-1].values())

