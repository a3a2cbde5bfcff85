r"""Training-step overhead of ENorm vs. BatchNorm and GroupNorm, side by side.

    python -m benchmarks.step [--quick] [--json PATH]

For each model: the plain step (forward, backward, SGD with momentum 0.9 and
weight decay), the same step wrapped in ``enorm`` (with the default sequential
schedule, the same without the outermost check, ``check_applied=False``, and
with the parallel schedule), and the model with BN and with GN instead. Overheads are fractions of the plain step's median time; all
variants are timed in alternation (one step of each per round).

Two more variants do less than an exact ENorm step must (see `row_rescale`),
so their overheads are a floor under ENorm's on this machine: ``bound`` adds one
unweighted norm pass over the SGD step's output and then rescales the weights
and the momentum by factors that depend on it; ``bound_params`` rescales the
weights only, as if the momentum's rescale were folded into the next step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import enorm_jax
from benchmarks import _common
from enorm_jax.models import CifarNV, FullyConnected, ResNet18C

VARIANTS = ("plain", "enorm", "enorm_unchecked", "enorm_parallel", "bn", "gn", "bound",
            "bound_params")
CONFIGS = [("FC-15", lambda **kw: FullyConnected(depth=15, **kw), (256, 3072), 256),
           ("CIFAR-NV", lambda **kw: CifarNV(**kw), (32, 28, 28, 3), 32),
           ("ResNet-18C", lambda **kw: ResNet18C(**kw), (32, 224, 224, 3), 32)]


def table1_counts():
  """The paper's Table 1 element counts for ResNet-18/50 at 224x224, batch B (per image)."""
  rows = []
  for name, convs in (("ResNet-18", _resnet_layers([2, 2, 2, 2], bottleneck=False)),
                      ("ResNet-50", _resnet_layers([3, 4, 6, 3], bottleneck=True))):
    weights = sum(k * k * cin * cout for k, cin, cout, _ in convs)
    activations = sum(cout * hw * hw for _, _, cout, hw in convs)
    rows.append(dict(model=name, enorm_elements=weights, bn_gn_elements_per_image=activations))
  return rows


def _resnet_layers(stages, bottleneck):
  layers, cin, hw = [(7, 3, 64, 112)], 64, 56
  for i, n in enumerate(stages):
    width = 64 * 2 ** i
    out = width * 4 if bottleneck else width
    for j in range(n):
      if i > 0 and j == 0:
        hw //= 2
      if bottleneck:
        layers += [(1, cin, width, hw), (3, width, width, hw), (1, width, out, hw)]
      else:
        layers += [(3, cin, width, hw), (3, width, width, hw)]
      if j == 0 and (cin != out or i > 0):
        layers.append((1, cin, out, hw))
      cin = out
  return layers


def row_rescale(inner: optax.GradientTransformation, rescale_state: bool = True
                ) -> optax.GradientTransformation:
  """Less than an exact ENorm cycle must do after ``inner``; a timing bound only.

  A cycle's factors depend on norms of the weights after the optimizer's
  step, so the balanced weights (and the rescaled momentum) can only be
  written after a pass that reads them. An exact cycle needs at least two
  such passes, one of them weighted; this does one unweighted pass (sums of
  w^2 over the last axis, XLA:CPU's cheapest reduction) and multiplies each
  row by a factor from its sum, dividing the momentum rows by it with
  ``rescale_state``. Not function-preserving: it only moves the same memory.
  """
  def row_factors(w):
    if w.ndim < 2:
      return None
    return jax.lax.rsqrt(1.0 + jnp.mean(w * w, axis=-1, keepdims=True))

  def update(updates, state, params, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    stepped = optax.apply_updates(params, updates)
    factors = jax.tree.map(row_factors, stepped)
    scaled = jax.tree.map(lambda w, f: w if f is None else w * f, stepped, factors,
                          is_leaf=lambda x: x is None)
    if rescale_state:
      state = optax.tree_utils.tree_map_params(
          inner, lambda m, f: m if f is None else m / f, state, factors,
          is_leaf=lambda x: x is None)
    return jax.tree.map(jnp.subtract, scaled, params), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_step(model, x, y, tx, has_stats):
  def loss_fn(params, stats):
    variables = {"params": params, **({"batch_stats": stats} if has_stats else {})}
    if has_stats:
      logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
      stats = new["batch_stats"]
    else:
      logits = model.apply(variables, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

  def step(state):
    params, stats, opt_state = state
    grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  return jax.jit(step, donate_argnums=0)


def inputs(shape):
  """A random input batch of ``shape`` and its (all-zero) labels."""
  return jax.random.normal(jax.random.key(0), shape), jnp.zeros((shape[0],), jnp.int32)


def variant_step(make, x, y, variant: str):
  """``(jitted step, initial state)`` of one of `VARIANTS` for model factory ``make``."""
  norm = {"bn": "batch", "gn": "group"}.get(variant, "none")
  model = make(norm=norm)
  variables = model.init(jax.random.key(1), x[:1])
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
  if variant.startswith("enorm"):
    schedule = "parallel" if variant == "enorm_parallel" else "sequential"
    tx = enorm_jax.enorm(tx, model.rescaling_graph(params), schedule=schedule,
                         check_applied=variant != "enorm_unchecked")
  elif variant.startswith("bound"):
    tx = row_rescale(tx, rescale_state=variant == "bound")
  return make_step(model, x, y, tx, bool(stats)), (params, stats, tx.init(params))


def main():
  parser = _common.parser(__doc__)
  parser.add_argument("--models", default="", help="comma-separated subset, e.g. ResNet-18C")
  parser.add_argument("--reps", type=int, default=0, help="timed repetitions per variant")
  args = parser.parse_args()
  reps = args.reps or (2 if args.quick else 15)
  configs = CONFIGS[:2] if args.quick else CONFIGS
  if args.models:
    configs = [c for c in CONFIGS if c[0] in args.models.split(",")]
  records = []
  for name, make, shape, batch in configs:
    x, y = inputs(shape)
    row = dict(model=name, batch_size=batch)
    steps = {variant: variant_step(make, x, y, variant) for variant in VARIANTS}
    ms = _common.interleaved_ms(steps, reps)
    row.update({f"{variant}_ms": ms[variant] for variant in steps})
    for v in VARIANTS[1:]:
      row[f"{v}_overhead"] = row[f"{v}_ms"] / row["plain_ms"] - 1
    for v in ("plain", "enorm", "bn", "gn"):
      row[f"{v}_images_per_s"] = batch / row[f"{v}_ms"] * 1e3
    row["enorm_over_bn"] = row["enorm_overhead"] / row["bn_overhead"]
    row["enorm_over_gn"] = row["enorm_overhead"] / row["gn_overhead"]
    records.append(row)
  _common.emit(records, ["model", "batch_size", "plain_ms", "enorm_overhead",
                         "enorm_unchecked_overhead", "bn_overhead", "gn_overhead",
                         "enorm_over_bn", "enorm_over_gn", "enorm_parallel_overhead",
                         "bound_overhead", "bound_params_overhead"],
               args.json)
  print("\nThroughput (images/s):")
  _common.emit(records, ["model", "batch_size", "plain_images_per_s", "enorm_images_per_s",
                         "bn_images_per_s", "gn_images_per_s"], None)
  print("\nPaper Table 1 (elements touched; BN/GN per image, multiply by the batch size):")
  _common.emit(table1_counts(), ["model", "enorm_elements", "bn_gn_elements_per_image"], None)


if __name__ == "__main__":
  main()
