"""The exact symmetries of a pre-LayerNorm transformer, as `RescalingGraph` groups.

Each symmetry is checked numerically (`check_graph`), `balance` keeps the
function, and `enorm(optax.adamw(...))` matches a hand-written AdamW whose
balancing is an independent NumPy implementation of the block's groups.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import enorm_jax
from enorm_jax import Entry, Group, RescalingGraph
from tests.chains import relative_error

D, HEADS, HEAD_DIM, HIDDEN, VOCAB = 16, 2, 4, 32, 11


class Block(nn.Module):
  """A pre-LN decoder block with a ReLU MLP, an embedding and a head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    h = nn.LayerNorm(name="ln_attn")(x)
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(HEADS, qkv_features=HEADS * HEAD_DIM,
                                            name="attn")(h, mask=mask)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.relu(nn.Dense(HIDDEN, name="fc1")(h))
    x = x + nn.Dense(D, name="fc2")(h)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_final")(x))


def block_graph():
  """The block's groups, written by hand: MLP units, query/key, value/output, norm scales."""
  qk = (1, 2)  # the (heads, head_dim) axes of a (D, heads, head_dim) projection
  return RescalingGraph((
      Group(HIDDEN, (Entry("fc1/kernel", 1, bias="fc1/bias"),), (Entry("fc2/kernel", 0),),
            name="mlp"),
      Group(HEADS * HEAD_DIM, (Entry("attn/query/kernel", qk),),
            (Entry("attn/key/kernel", qk),), biases=(Entry("attn/query/bias", (0, 1)),),
            consumer_biases=(Entry("attn/key/bias", (0, 1)),), name="query/key"),
      Group(HEADS * HEAD_DIM, (Entry("attn/value/kernel", qk),),
            (Entry("attn/out/kernel", (0, 1)),), biases=(Entry("attn/value/bias", (0, 1)),),
            name="value/out"),
      Group(D, (Entry("ln_attn/scale", 0, bias="ln_attn/bias"),),
            tuple(Entry(f"attn/{n}/kernel", 0) for n in ("query", "key", "value")),
            name="ln_attn"),
      Group(D, (Entry("ln_mlp/scale", 0, bias="ln_mlp/bias"),), (Entry("fc1/kernel", 0),),
            name="ln_mlp"),
      Group(D, (Entry("ln_final/scale", 0, bias="ln_final/bias"),),
            (Entry("head/kernel", 0),), name="ln_final"),
  ))


def _setup(seed=0):
  model = Block()
  tokens = jax.random.randint(jax.random.key(seed), (3, 7), 0, VOCAB)
  params = model.init(jax.random.key(seed + 1), tokens)["params"]
  # Non-trivial norm scales and biases, so that every symmetry is exercised.
  keys = iter(jax.random.split(jax.random.key(seed + 2), 64))
  params = jax.tree.map(lambda x: x * jnp.exp(0.5 * jax.random.normal(next(keys), x.shape))
                        + 0.1 * jax.random.normal(next(keys), x.shape), params)
  apply = lambda p, t: model.apply({"params": p}, t)
  return model, params, tokens, apply


def test_every_transformer_symmetry_keeps_the_function():
  _, params, tokens, apply = _setup()
  graph = block_graph()
  # An independent random power-of-two factor per unit of every group: each
  # symmetry is checked, and a wrong one fails (next test).
  enorm_jax.check_graph(apply, params, graph, tokens)


@pytest.mark.parametrize("wrong", ["query_bias_left_alone", "query_bias_divided",
                                   "value_as_query"])
def test_a_wrong_attention_group_fails_the_check(wrong):
  # (The key bias cannot be got wrong: it shifts all of a query's scores by q . b_k,
  # which softmax ignores. Dividing it keeps even the scores exact.)
  _, params, tokens, apply = _setup()
  g = block_graph().groups[1]
  if wrong == "query_bias_left_alone":
    g = Group(g.size, g.producers, g.consumers, consumer_biases=g.consumer_biases)
  elif wrong == "query_bias_divided":
    g = Group(g.size, g.producers, g.consumers,
              consumer_biases=g.consumer_biases + g.biases)
  else:  # scores do not keep their value when v is scaled against k
    g = Group(g.size, (Entry("attn/value/kernel", (1, 2)),), g.consumers)
  with pytest.raises(ValueError, match="does not preserve the function"):
    enorm_jax.check_graph(apply, params, RescalingGraph((g,)), tokens)


@pytest.mark.parametrize("include_biases", [False, True])
def test_balance_keeps_the_function_and_lowers_the_energy(include_biases):
  _, params, tokens, apply = _setup()
  graph = block_graph()
  balanced, _ = enorm_jax.balance(params, graph, cycles=5, include_biases=include_biases)
  out, got = apply(params, tokens), apply(balanced, tokens)
  assert relative_error(got, out) < 2e-5
  before = enorm_jax.energy(params, graph, include_biases=include_biases)
  after = enorm_jax.energy(balanced, graph, include_biases=include_biases)
  assert float(after) < 0.9 * float(before)
  # The result agrees with the independent reference.
  want, _ = reference_balance(params, cycles=5, include_biases=include_biases)
  for path, leaf in _flat(balanced).items():
    np.testing.assert_allclose(leaf, want[path], rtol=2e-4, atol=1e-6, err_msg=path)


# --- An independent NumPy implementation of the block's groups. ---

def _flat(tree):
  return {"/".join(str(k.key) for k in kp): np.asarray(v, np.float64)
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat, like):
  paths = _flat(like)
  leaves = [jnp.asarray(flat[p], jnp.float32) for p in paths]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def reference_balance(params, cycles=1, c=1.0, include_biases=False):
  """Gauss-Seidel over the block's groups in `block_graph` order; returns the
  balanced flat params and each parameter's elementwise factor (new / old)."""
  w = _flat(params)
  factor = {k: np.ones_like(v) for k, v in w.items()}
  q, k, v, o = (f"attn/{n}/kernel" for n in ("query", "key", "value", "out"))

  def scale(path, d, index):
    w[path][index] *= d
    factor[path][index] *= d

  def sq(path, index):
    return np.sum(w[path][index] ** 2)

  for _ in range(cycles):
    for u in range(HIDDEN):  # MLP hidden units
      left = sq("fc1/kernel", (slice(None), u)) + include_biases * w["fc1/bias"][u] ** 2
      d = np.sqrt(np.sqrt(sq("fc2/kernel", u) / left) / c)
      scale("fc1/kernel", d, (slice(None), u)); scale("fc1/bias", d, u)
      scale("fc2/kernel", 1 / d, u)
    for h in range(HEADS):
      for j in range(HEAD_DIM):
        col = (slice(None), h, j)
        left = sq(q, col) + include_biases * w["attn/query/bias"][h, j] ** 2
        right = sq(k, col) + include_biases * w["attn/key/bias"][h, j] ** 2
        d = np.sqrt(np.sqrt(right / left) / c)
        scale(q, d, col); scale("attn/query/bias", d, (h, j))
        scale(k, 1 / d, col); scale("attn/key/bias", 1 / d, (h, j))
    for h in range(HEADS):
      for j in range(HEAD_DIM):
        col = (slice(None), h, j)
        left = sq(v, col) + include_biases * w["attn/value/bias"][h, j] ** 2
        d = np.sqrt(np.sqrt(sq(o, (h, j)) / left) / c)
        scale(v, d, col); scale("attn/value/bias", d, (h, j)); scale(o, 1 / d, (h, j))
    for norm, readers in (("ln_attn", (q, k, v)), ("ln_mlp", ("fc1/kernel",)),
                          ("ln_final", ("head/kernel",))):
      for u in range(D):
        left = w[f"{norm}/scale"][u] ** 2 + include_biases * w[f"{norm}/bias"][u] ** 2
        d = np.sqrt(np.sqrt(sum(sq(r, u) for r in readers) / left) / c)
        scale(f"{norm}/scale", d, u); scale(f"{norm}/bias", d, u)
        for r in readers:
          scale(r, 1 / d, u)
  return w, factor


def test_enorm_adamw_matches_a_hand_written_reference():
  _, params, tokens, apply = _setup(seed=3)
  targets = jnp.roll(tokens, -1, axis=1)
  graph = block_graph()
  lr, b1, b2, eps, wd, steps = 3e-3, 0.9, 0.99, 1e-8, 1e-2, 6

  def loss(p):
    logits = apply(p, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  tx = enorm_jax.enorm(optax.adamw(lr, b1, b2, eps, weight_decay=wd), graph)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  p, state = params, tx.init(params)
  for _ in range(steps):
    p, state = step(p, state)

  w = _flat(params)
  mu = {k: np.zeros_like(x) for k, x in w.items()}
  nu = {k: np.zeros_like(x) for k, x in w.items()}
  grad = jax.jit(jax.grad(loss))
  for t in range(1, steps + 1):
    grads = _flat(grad(_unflat(w, params)))
    for key in w:
      mu[key] = b1 * mu[key] + (1 - b1) * grads[key]
      nu[key] = b2 * nu[key] + (1 - b2) * grads[key] ** 2
      adam = (mu[key] / (1 - b1 ** t)) / (np.sqrt(nu[key] / (1 - b2 ** t)) + eps)
      w[key] = w[key] - lr * (adam + wd * w[key])
    w, factor = reference_balance(_unflat(w, params))
    mu = {key: mu[key] / factor[key] for key in w}
    nu = {key: nu[key] / factor[key] ** 2 for key in w}
  got = _flat(p)
  for key in w:
    if key == "attn/key/bias":
      # Softmax ignores the key bias, so its gradient is rounding noise, which Adam
      # normalizes into steps of about lr: compare it to that bound only.
      assert np.max(np.abs(got[key] - w[key])) <= 2 * steps * lr * np.max(np.abs(w[key]) + 1)
      continue
    np.testing.assert_allclose(got[key], w[key], rtol=2e-3, atol=2e-5, err_msg=key)


# --- The tracer finds every symmetry. ---

def _groups_by_paths(graph):
  return {(tuple(e.path for e in g.producers), tuple(e.path for e in g.consumers),
           tuple(e.path for e in g.biases), tuple(e.path for e in g.consumer_biases)): g.size
          for g in graph}


def test_trace_finds_every_symmetry_of_a_linen_block():
  _, params, tokens, apply = _setup()
  report = enorm_jax.explain_graph(apply, params, tokens)
  assert _groups_by_paths(report.graph) == _groups_by_paths(block_graph())
  assert report.graph.num_units == HIDDEN + 2 * HEADS * HEAD_DIM + 3 * D
  enorm_jax.check_graph(apply, params, report.graph, tokens)
  balanced, _ = enorm_jax.balance(params, report.graph, cycles=3)
  out = apply(params, tokens)
  assert relative_error(apply(balanced, tokens), out) < 2e-5
  text = "\n".join(report.stopped)
  assert "attn/out outputs: added to a value that does not scale with it" in text  # residual


def _init(model):
  """(params, tokens, apply) of a Linen language model on random tokens."""
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, VOCAB)
  params = model.init(jax.random.key(1), tokens)["params"]
  return params, tokens, lambda p, t: model.apply({"params": p}, t)


class EinsumLM(nn.Module):
  """Hand-written attention (einsum, causal mask, RMSNorm, eval dropout), 2 layers."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for _ in range(2):
      h = nn.RMSNorm()(x)
      q = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False)(h)
      k = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False)(h)
      v = nn.DenseGeneral((HEADS, HEAD_DIM))(h)
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(HEAD_DIM)
      weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
      weights = nn.Dropout(0.1, deterministic=True)(weights)
      a = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
      x = x + nn.DenseGeneral(D, axis=(-2, -1))(a)
      h = nn.relu(nn.Dense(HIDDEN)(nn.RMSNorm()(x)))
      x = x + nn.Dropout(0.1, deterministic=True)(nn.Dense(D)(h))
    return nn.Dense(VOCAB)(nn.RMSNorm()(x))


def test_trace_finds_hand_written_einsum_attention_with_rmsnorm():
  params, tokens, apply = _init(EinsumLM())
  report = enorm_jax.explain_graph(apply, params, tokens)
  # Per layer: attention norm, query/key, value/out, MLP norm, MLP; then the final norm.
  assert len(report.graph) == 11, report.describe()
  assert report.graph.num_units == 2 * (D + 2 * HEADS * HEAD_DIM + D + HIDDEN) + D
  enorm_jax.check_graph(apply, params, report.graph, tokens)


def test_trace_finds_nnx_multi_head_attention():
  from flax import nnx

  class NnxBlock(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
      self.norm = nnx.LayerNorm(D, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(HEADS, D, qkv_features=HEADS * HEAD_DIM,
                                         decode=False, rngs=rngs)
      self.mlp_norm = nnx.LayerNorm(D, rngs=rngs)
      self.fc1, self.fc2 = nnx.Linear(D, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, D, rngs=rngs)
      self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens)
      x = x + self.attn(self.norm(x), mask=nnx.make_causal_mask(tokens))
      x = x + self.fc2(nnx.relu(self.fc1(self.mlp_norm(x))))
      return self.head(x)

  graphdef, state = nnx.split(NnxBlock(nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)
  apply = lambda s, t: nnx.merge(graphdef, s)(t)
  graph = enorm_jax.trace_graph(apply, state, tokens)
  # norm -> q/k/v, query/key, value/out, MLP norm -> fc1, MLP hidden.
  assert len(graph) == 5
  assert graph.num_units == D + 2 * HEADS * HEAD_DIM + D + HIDDEN
  enorm_jax.check_graph(apply, state, graph, tokens)


def test_a_product_of_a_value_with_itself_is_not_a_symmetry():
  """x . x (a Gram matrix) would tie each unit to its own inverse: d = 1/d."""
  params = {"a": jax.random.normal(jax.random.key(0), (4, 3)),
            "b": jax.random.normal(jax.random.key(1), (5, 2))}
  fn = lambda p, x: (jnp.einsum("ni,mi->nm", x @ p["a"], x @ p["a"])).reshape(-1, 5) @ p["b"]
  report = enorm_jax.explain_graph(fn, params, jnp.ones((5, 4)))
  assert report.graph.num_units == 0
  assert any("inverse" in line for line in report.stopped), report.stopped


def _rotary(x):
  """Rotary position embedding of (batch, time, heads, head_dim): pairs (j, j + half)."""
  t, d = x.shape[1], x.shape[-1]
  angle = jnp.arange(t)[:, None] / (10000 ** (jnp.arange(d // 2) / (d // 2)))[None, :]
  cos = jnp.concatenate([jnp.cos(angle)] * 2, -1)[None, :, None, :]
  sin = jnp.concatenate([jnp.sin(angle)] * 2, -1)[None, :, None, :]
  return x * cos + jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


class RotaryAttention(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    h = nn.RMSNorm()(x)
    q = _rotary(nn.DenseGeneral((HEADS, HEAD_DIM), name="query")(h))
    k = _rotary(nn.DenseGeneral((HEADS, HEAD_DIM), name="key")(h))
    v = nn.DenseGeneral((HEADS, HEAD_DIM))(h)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
    x = x + nn.DenseGeneral(D, axis=(-2, -1))(jnp.einsum("bhqk,bkhd->bqhd", weights, v))
    return nn.Dense(VOCAB)(nn.RMSNorm()(x))


def test_rotary_pairs_share_one_factor():
  params, tokens, apply = _init(RotaryAttention())
  graph = enorm_jax.trace_graph(apply, params, tokens)
  query_key = next(g for g in graph if g.producers[0].path == "query/kernel")
  assert query_key.size == HEADS * HEAD_DIM // 2  # one unit per rotated pair
  assert [e.path for e in query_key.consumers] == ["key/kernel"]
  enorm_jax.check_graph(apply, params, graph, tokens)
  balanced, _ = enorm_jax.balance(params, graph, cycles=3)
  out = apply(params, tokens)
  assert relative_error(apply(balanced, tokens), out) < 2e-5
