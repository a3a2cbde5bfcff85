"""Training and evaluation of the character transformer with AdamW or enorm(AdamW).

Methods (``config.method``): ``adamw``; ``enorm``: ``enorm_jax.enorm(adamw)`` on
every group `enorm_jax.trace_graph` finds (norm scales, query/key, value/output,
MLP hidden units); ``enorm_mlp``: the same on the MLP hidden units only;
``enorm_attn``: on every group but those, so that each family's own effect shows.
Architectures (``config.architecture``): ``gpt`` and ``llama`` (`models`).
``config.lr_multipliers`` scales the learning rate per kind of weight (`weight_kind`),
for the control that gives AdamW the relative steps ENorm's balance gives it.
"""

from __future__ import annotations

import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import enorm_jax
from experiments.common import methods, trainer
from experiments.common.data import prefetch
from experiments.tinyshakespeare import input_pipeline, models

METHODS = ("adamw", "enorm", "enorm_mlp", "enorm_attn")


def validate_config(config: ml_collections.ConfigDict) -> None:
  methods.check_method(config, METHODS)
  if config.architecture not in models.MLP_HIDDEN_KERNELS:
    raise ValueError(f"config.architecture={config.architecture!r}: expected one of "
                     f"{sorted(models.MLP_HIDDEN_KERNELS)}.")
  if config.architecture == "llama" and config.num_heads % config.num_kv_heads:
    raise ValueError(f"config.num_heads={config.num_heads} must be a multiple of "
                     f"config.num_kv_heads={config.num_kv_heads}.")
  parse_lr_multipliers(config.lr_multipliers)
  if config.eval_every_steps < 1:
    raise ValueError("config.eval_every_steps must be >= 1.")
  if not 0 <= config.warmup_steps < config.num_steps:
    raise ValueError(f"config.warmup_steps={config.warmup_steps} must be in "
                     f"[0, num_steps={config.num_steps}).")


def weight_kind(path: str) -> str | None:
  """'block0_attn/query/kernel' -> 'query', 'layers/up/kernel' -> 'up', norms' gains ->
  'attn_norm'...; None for embeddings, the head and biases."""
  parts = [re.sub(r"^block\d+_", "", p) for p in path.split("/")]
  if parts[-1] not in ("kernel", "scale") or parts[0] in ("head", "embed"):
    return None
  return parts[-2]


def parse_lr_multipliers(text: str) -> dict[str, float]:
  """``'query=1.4,key=1.4'`` -> ``{'query': 1.4, 'key': 1.4}``; ``''`` -> ``{}``."""
  multipliers = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    kind, _, value = (t.strip() for t in item.partition("="))
    try:
      multiplier = float(value)
    except ValueError:
      multiplier = float("nan")
    if not kind or not multiplier > 0:
      raise ValueError(f"config.lr_multipliers={text!r}: expected 'kind=multiplier,...' with "
                       f"multipliers > 0, e.g. 'query=1.4,key=1.4'; got {item!r}.")
    multipliers[kind] = multiplier
  return multipliers


def per_kind_rates(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of each kind of weight (`weight_kind`) by its multiplier;
  chained after AdamW, a per-kind learning rate (decay included)."""
  def labels(params):
    kinds = [weight_kind(p) for p in enorm_jax.leaves_by_path(params)]  # leaf order
    if unknown := sorted(set(multipliers) - set(kinds)):
      raise ValueError(f"config.lr_multipliers names {unknown}, which no parameter is; "
                       f"the kinds are {sorted({k for k in kinds if k})}.")
    return jax.tree.unflatten(jax.tree.structure(params),
                              [k if k in multipliers else "unscaled" for k in kinds])
  transforms = {k: optax.scale(m) for k, m in multipliers.items()}
  return optax.multi_transform(dict(transforms, unscaled=optax.identity()), labels)


def matched_multipliers(results: dict, first: int = 50, last: int = 900) -> str:
  """From the dynamics tool's ``results``: per kind, the median over measured steps in
  [first, last] of ENorm's relative step over AdamW's, as `config.lr_multipliers`
  (2 decimals, kinds sorted): the per-kind rates that give AdamW ENorm's steps."""
  ratios = {}
  for step, enorm_step, adamw_step in zip(results["enorm"]["step"],
                                          results["enorm"]["relative_step"],
                                          results["adamw"]["relative_step"]):
    if first <= step <= last:
      for kind, value in enorm_step.items():
        ratios.setdefault(kind, []).append(value / adamw_step[kind])
  if not ratios:
    raise ValueError(f"no measured step in [{first}, {last}].")
  return ",".join(f"{k}={np.median(v):.2f}" for k, v in sorted(ratios.items()))


def uniform_multipliers(matched: str, sizes: dict[str, int]) -> str:
  """The control for `matched_multipliers`: every kind of ``matched`` at one
  multiplier, their root mean square weighted by each kind's parameter count
  (``sizes``), so AdamW's update has the matched runs' total size without their
  reallocation between kinds."""
  multipliers = parse_lr_multipliers(matched)
  if missing := sorted(set(multipliers) - set(sizes)):
    raise ValueError(f"sizes has no parameter count for {missing}.")
  n = np.array([sizes[k] for k in multipliers], np.float64)
  m = np.array(list(multipliers.values()), np.float64)
  rms = float(np.sqrt(np.sum(n * m * m) / np.sum(n)))
  return ",".join(f"{k}={rms:.2f}" for k in sorted(multipliers))


def kind_sizes(config) -> dict[str, int]:
  """Parameter count of each kind of weight (`weight_kind`) of ``config``'s model
  (the embedding and the head have no kind, so the vocabulary does not matter)."""
  model = create_model(config, vocab_size=2)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, config.context), jnp.int32))["params"]
  sizes = {}
  for path, leaf in enorm_jax.leaves_by_path(shapes).items():
    if (kind := weight_kind(path)) is not None:
      sizes[kind] = sizes.get(kind, 0) + math.prod(leaf.shape)
  return sizes


def create_model(config, vocab_size: int):
  if config.architecture == "llama":
    return models.LlamaLM(vocab_size, config.num_layers, config.width, config.num_heads,
                          config.num_kv_heads, config.llama_mlp_width)
  return models.DecoderLM(vocab_size, config.num_layers, config.width, config.num_heads,
                          config.mlp_width, config.context)


def rescaling_graph(model, params, config) -> enorm_jax.RescalingGraph:
  """The traced graph: every group, its MLP groups (``enorm_mlp``) or the others
  (``enorm_attn``)."""
  tokens = jnp.zeros((1, config.context), jnp.int32)
  graph = enorm_jax.trace_graph(lambda p, t: model.apply({"params": p}, t), params, tokens)
  hidden = models.MLP_HIDDEN_KERNELS[config.architecture]
  is_mlp = lambda g: all(e.path.endswith(hidden) for e in g.producers)
  if config.method in ("enorm_mlp", "enorm_attn"):
    keep = config.method == "enorm_mlp"
    graph = enorm_jax.RescalingGraph(tuple(g for g in graph if is_mlp(g) == keep))
  return graph


def create_optimizer(config, graph) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                config.warmup_steps, config.num_steps)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  if multipliers := parse_lr_multipliers(config.lr_multipliers):
    tx = optax.chain(tx, per_kind_rates(multipliers))
  if config.method == "adamw":
    return tx
  # 'record': the outermost check without control flow in the step (the raising
  # check costs 5-13 % of this step on XLA:CPU); a mismatch is raised by `diagnose` below.
  return enorm_jax.enorm(tx, graph, c=config.c, check_applied="record")


def loss_sums(logits, tokens_out):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         tokens_out)
  return jnp.sum(loss), jnp.asarray(loss.size, jnp.float32)


def make_steps(model, tx, mesh):
  """Jitted (train_step, eval_step): batch sharded over ``mesh``, state replicated."""
  replicated, sharded = trainer.replicated(mesh), trainer.data_sharded(mesh)

  def loss_fn(params, tokens):
    total, count = loss_sums(model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])
    return total / count

  @functools.partial(jax.jit, in_shardings=(replicated, {"tokens": sharded}),
                     out_shardings=(replicated, replicated), donate_argnums=0)
  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["tokens"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), \
        {"loss": loss}

  @functools.partial(jax.jit, in_shardings=(replicated, {"tokens": sharded}),
                     out_shardings=replicated)
  def eval_step(params, batch):
    tokens = batch["tokens"]
    return loss_sums(model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])

  return train_step, eval_step


def evaluate(eval_step, state, corpus, config, mesh) -> dict[str, float]:
  total, count = 0.0, 0.0
  for batch in input_pipeline.validation_batches(corpus, config.batch_size, config.context,
                                                 config.eval_batches):
    t, c = eval_step(state.params, trainer.shard_batch(batch, mesh))
    total, count = total + float(t), count + float(c)
  return {"validation_loss": total / count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[trainer.TrainState, dict[str, Any]]:
  """Trains ``config`` in ``workdir`` (resuming if possible); returns the final state
  and the final metrics (validation loss in nats per character)."""
  validate_config(config)
  mesh = trainer.make_mesh(config.num_devices)
  trainer.check_batch_size(config.batch_size, mesh)
  trainer.check_workdir(workdir)
  corpus = input_pipeline.make_corpus(input_pipeline.read_text(config.data_dir),
                                      config.validation_fraction)
  model = create_model(config, len(corpus.vocab))
  params = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, config.context), jnp.int32))["params"]
  graph = rescaling_graph(model, params, config) if config.method != "adamw" else None
  tx = create_optimizer(config, graph)
  state = trainer.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                             opt_state=tx.init(params))
  train_step, eval_step = make_steps(model, tx, mesh)
  start = time.perf_counter()
  state, metrics = trainer.fit(
      state, train_step=train_step, mesh=mesh, total_steps=config.num_steps,
      batches=lambda step: prefetch(input_pipeline.train_batches(
          corpus, config.batch_size, config.context, config.seed, step)),
      steps_per_epoch=config.eval_every_steps, workdir=workdir,
      evaluate=lambda s: evaluate(eval_step, s, corpus, config, mesh),
      checkpoint_every_steps=config.eval_every_steps,
      log_every_steps=min(config.log_every_steps, config.eval_every_steps),
      desc=f"tinyshakespeare/{config.method}",
      diagnose=lambda s: enorm_jax.raise_if_misapplied(s.opt_state, graph) if graph else None)
  metrics = dict(metrics)
  metrics["train_time_s"] = time.perf_counter() - start
  metrics["rescaled_units"] = graph.num_units if graph is not None else 0
  metrics["parameters"] = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return state, metrics
