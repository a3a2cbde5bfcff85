"""Fast tests of the tiny-Shakespeare trainer on a generated text."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

from experiments.tinyshakespeare import input_pipeline, train
from experiments.tinyshakespeare.configs import default


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("shakespeare")
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "\n"]
  with open(folder / "input.txt", "w") as f:
    f.write(" ".join(rng.choice(words, 4000)))
  return str(folder)


def tiny_config(data_dir, method, **overrides):
  config = default.get_config()
  config.update(data_dir=data_dir, method=method, num_layers=2, width=16, num_heads=2,
                mlp_width=32, context=16, batch_size=8, num_steps=6, warmup_steps=2,
                eval_every_steps=3, log_every_steps=3, eval_batches=2)
  config.update(**overrides)
  return config


def test_the_split_is_the_first_90_percent(data_dir):
  corpus = input_pipeline.make_corpus(input_pipeline.read_text(data_dir), 0.1)
  assert len(corpus.train) == int(0.9 * (len(corpus.train) + len(corpus.validation)))
  first = next(input_pipeline.train_batches(corpus, 4, 16, seed=0, start_step=5))
  again = next(input_pipeline.train_batches(corpus, 4, 16, seed=0, start_step=5))
  np.testing.assert_array_equal(first["tokens"], again["tokens"])  # resumable
  assert first["tokens"].shape == (4, 17)


@pytest.mark.parametrize("method, units", [  # enorm trains in the next test
    pytest.param("enorm_mlp", 2 * 32, marks=pytest.mark.slow),
    pytest.param("adamw", 0, marks=pytest.mark.slow)])
def test_each_method_trains(data_dir, tmp_path, method, units):
  _, metrics = train.train_and_evaluate(tiny_config(data_dir, method), str(tmp_path))
  assert np.isfinite(metrics["validation_loss"])
  assert metrics["rescaled_units"] == units
  assert os.path.exists(tmp_path / "metrics.jsonl")


def test_one_enorm_step_computes_the_adamw_function(data_dir, tmp_path):
  """The first enorm(adamw) update is adamw's, then a rescaling: same validation loss."""
  metrics = {m: train.train_and_evaluate(
      tiny_config(data_dir, m, num_steps=1, warmup_steps=0, eval_every_steps=1),
      str(tmp_path / m))[1] for m in ("adamw", "enorm")}
  # Per layer: attention norm, query/key, value/out, MLP norm, MLP; then the final norm.
  assert metrics["enorm"]["rescaled_units"] == 2 * (16 + 16 + 16 + 16 + 32) + 16
  assert metrics["enorm"]["validation_loss"] == pytest.approx(
      metrics["adamw"]["validation_loss"], rel=1e-5)


def llama_config(data_dir, method, **overrides):
  return tiny_config(data_dir, method, architecture="llama", num_kv_heads=1,
                     llama_mlp_width=24, **overrides)


@pytest.mark.parametrize("method, units", [
    # Per layer: 2 norms (16 each), query/key (1 K/V head x 4 rotated pairs),
    # value/out (8), SwiGLU up/down (24); then the final norm (16).
    ("enorm", 2 * (16 + 16 + 4 + 8 + 24) + 16),
    ("enorm_mlp", 2 * 24),
    ("enorm_attn", 2 * (16 + 16 + 4 + 8) + 16)])
def test_each_method_rescales_its_llama_groups(data_dir, method, units):
  config = llama_config(data_dir, method)
  model = train.create_model(config, 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, config.context), jnp.int32))["params"]
  assert train.rescaling_graph(model, params, config).num_units == units


@pytest.mark.slow  # the GPT model's test covers the step; the one above, the Llama graph
def test_the_llama_model_computes_the_adamw_function(data_dir, tmp_path):
  """Llama-style (RMSNorm, RoPE, GQA 2/1, SwiGLU, nn.scan): the first enorm(adamw)
  update computes AdamW's function."""
  config = lambda m: llama_config(data_dir, m, num_steps=1, warmup_steps=0,
                                  eval_every_steps=1)
  metrics = {m: train.train_and_evaluate(config(m), str(tmp_path / m))[1]
             for m in ("adamw", "enorm")}
  assert metrics["enorm"]["rescaled_units"] == 2 * (16 + 16 + 4 + 8 + 24) + 16
  assert metrics["enorm"]["validation_loss"] == pytest.approx(
      metrics["adamw"]["validation_loss"], rel=1e-5)


def test_bad_settings_fail_early(data_dir, tmp_path):
  with pytest.raises(ValueError, match="config.method='sgd' is unknown"):
    train.train_and_evaluate(tiny_config(data_dir, "sgd"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="has no input.txt"):
    train.train_and_evaluate(tiny_config(str(tmp_path), "adamw"), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="config.architecture='gpt2'"):
    train.train_and_evaluate(tiny_config(data_dir, "adamw", architecture="gpt2"),
                             str(tmp_path / "a"))
  with pytest.raises(ValueError, match="config.lr_multipliers='query'"):
    train.train_and_evaluate(tiny_config(data_dir, "adamw", lr_multipliers="query"),
                             str(tmp_path / "m"))
  with pytest.raises(ValueError, match="got 'key=-1'"):
    train.parse_lr_multipliers("query=2, key=-1")


@pytest.mark.parametrize("architecture", ["gpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_per_kind_rates_multiply_each_kinds_adamw_update(architecture):
  config = tiny_config("", "adamw", architecture=architecture, num_kv_heads=1,
                       llama_mlp_width=24)
  model = train.create_model(config, 11)
  params = jax.jit(model.init)(jax.random.key(0),
                                jnp.zeros((1, config.context), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
  plain = train.create_optimizer(config, None)
  config.lr_multipliers = "query=2.5, attn_norm=0.5"
  scaled = train.create_optimizer(config, None)
  expected, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  got, _ = jax.jit(scaled.update)(grads, scaled.init(params), params)
  factor = {"query": 2.5, "attn_norm": 0.5}
  seen = set()
  for path, g in enorm_jax.leaves_by_path(got).items():
    kind = train.weight_kind(path)
    seen.add(kind)
    np.testing.assert_allclose(g, factor.get(kind, 1.0) * enorm_jax.leaves_by_path(
        expected)[path], rtol=1e-6, err_msg=path)
  assert {"query", "attn_norm"} <= seen
  config.lr_multipliers = "querry=2"
  with pytest.raises(ValueError, match=r"names \['querry'\], which no parameter is"):
    train.create_optimizer(config, None).init(params)


def test_matched_multipliers_are_median_step_ratios_in_the_window():
  steps = [1, 50, 100, 150, 950]
  adamw = [{"query": 1.0, "fc1": 2.0}] * len(steps)
  enorm = [{"query": q, "fc1": 3.0} for q in (9.0, 1.2, 1.6, 1.3, 9.0)]
  results = {"adamw": {"step": steps, "relative_step": adamw},
             "enorm": {"step": steps, "relative_step": enorm}}
  assert train.matched_multipliers(results) == "fc1=1.50,query=1.30"
  with pytest.raises(ValueError, match="no measured step"):
    train.matched_multipliers(results, first=200, last=900)


def test_the_uniform_control_has_the_matched_rates_size_weighted_rms():
  sizes = {"query": 100, "fc1": 300, "attn_norm": 5}
  # sqrt((100 * 2^2 + 300 * 1^2) / 400) = sqrt(1.75)
  assert train.uniform_multipliers("fc1=1.0,query=2.0", sizes) == "fc1=1.32,query=1.32"
  with pytest.raises(ValueError, match="no parameter count for \\['key'\\]"):
    train.uniform_multipliers("key=1.5", sizes)
  gpt = default.get_config()
  sizes = train.kind_sizes(gpt)
  w, m = gpt.width, gpt.mlp_width
  assert sizes["query"] == sizes["out"] == gpt.num_layers * w * w
  assert sizes["fc1"] == sizes["fc2"] == gpt.num_layers * w * m
  assert sizes["attn_norm"] == gpt.num_layers * w and sizes["final_norm"] == w
