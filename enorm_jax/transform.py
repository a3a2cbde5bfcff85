"""`enorm`: an optax wrapper that balances the params after every inner step."""

import numbers
import warnings
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from enorm_jax import outermost
from enorm_jax import paths as tree_paths
from enorm_jax.balance import FIRST_MOMENT, PARAM_COPY, SECOND_MOMENT, balance, check_hyperparams
from enorm_jax.graph import RescalingGraph, require_graph
from enorm_jax.plan import Plan, Scales

# The power (`FIRST_MOMENT`, `SECOND_MOMENT`, `PARAM_COPY`) of each params-shaped
# state field, keyed by the name of the field that holds the tree.
DEFAULT_STATE_ROLES: Mapping[str, int] = {
    # gradients and first moments: g -> g / s
    "trace": FIRST_MOMENT,      # optax.trace / sgd(momentum=...)
    "mu": FIRST_MOMENT,         # adam, adamw, lion, sophia, adopt, ...
    "acc_grads": FIRST_MOMENT,  # optax.MultiSteps
    "ema": FIRST_MOMENT,        # optax.ema (an average of updates)
    "grad_acc": FIRST_MOMENT,
    "momentum": FIRST_MOMENT,
    "exp_avg": FIRST_MOMENT,    # contrib: prodigy, dadapt_adamw, momo
    "grad_sum": FIRST_MOMENT,   # contrib: prodigy (EMA of step-weighted gradients)
    "m1": FIRST_MOMENT,         # contrib: ademamix (fast EMA)
    "m2": FIRST_MOMENT,         # contrib: ademamix (slow EMA)
    "m": FIRST_MOMENT,          # contrib: simplified_ademamix
    "s": FIRST_MOMENT,          # contrib: madgrad (weighted sum of gradients)
    # second moments: g**2 -> g**2 / s**2
    "nu": SECOND_MOMENT,             # adam, rmsprop, adabelief; sophia's Hessian EMA
    "sum_of_squares": SECOND_MOMENT,  # adagrad
    "nu_max": SECOND_MOMENT,         # amsgrad
    "exp_avg_sq": SECOND_MOMENT,     # contrib: prodigy, dadapt_adamw, momo
    "grad_sum_sq": SECOND_MOMENT,    # contrib: madgrad
    "n": SECOND_MOMENT,              # contrib: simplified_ademamix
    "v": SECOND_MOMENT,              # adafactor's unfactored moments (factored=False)
    # parameter copies: w -> w * s
    "slow": PARAM_COPY,
    "slow_params": PARAM_COPY,
    "ema_params": PARAM_COPY,
    "z": PARAM_COPY,            # contrib: schedule_free
    "params0": PARAM_COPY,      # contrib: prodigy (initial point)
    "init_params": PARAM_COPY,  # contrib: dog, dowg
    "x0": PARAM_COPY,           # contrib: mechanize, madgrad
}
# Adafactor's factored second moments: a row and a column mean of g**2 cannot be
# rescaled exactly by per-element factors d_out / d_in.
_FACTORED_FIELDS = ("v_row", "v_col")


def _field_names(tree: Any) -> set[str]:
  """Every NamedTuple field and dict key in ``tree``, leaves or not."""
  names: set[str] = set()
  if hasattr(type(tree), "_fields"):
    names |= set(tree._fields)
  if isinstance(tree, Mapping):
    names |= {str(k) for k in tree}
    values = list(tree.values())
  elif isinstance(tree, (tuple, list)):
    values = list(tree)
  else:
    values = []
  for v in values:
    names |= _field_names(v)
  return names


def _suggested_role(field: str) -> str:
  """The role a state field's name suggests, for the error message."""
  lowered = field.lower()
  if any(k in lowered for k in ("sq", "nu", "second", "hess", "var")):
    return "SECOND_MOMENT"
  if any(k in lowered for k in ("param", "init", "slow", "x0", "anchor", "weights")):
    return "PARAM_COPY"
  return "FIRST_MOMENT"


BIAS_STEPS = ("balanced", "unbalanced")


class EnormState(NamedTuple):
  """State of `enorm`: a step counter, the inner optimizer's state, with
  ``bias_steps='unbalanced'`` each group's accumulated unit factors, and with
  ``check_applied`` a fingerprint of the params the last update made."""

  count: jax.Array  # int32, number of updates so far
  inner_state: Any  # the inner optimizer's state
  unit_scales: tuple = ()  # per group, float32 (unit count,)
  applied: Any = ()  # float32 (checked leaves, 2): [sum, sum of squares] per leaf


def _params_key_paths(params: Any) -> set[tuple[str, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {tuple(tree_paths.key_name(k) for k in kp) for kp, _ in flat}


def _state_role(key_path: tuple[Any, ...], params_paths, roles: Mapping[str, int]):
  """(param path, field name, power) of a params-shaped state leaf."""
  names = tuple(tree_paths.key_name(k) for k in key_path)
  for start in range(len(names)):
    if names[start:] in params_paths:
      param_path = tree_paths.key_path_str(key_path[start:])
      named = [(k, n) for k, n in zip(key_path[:start], names[:start])
               if not isinstance(k, jax.tree_util.SequenceKey)]
      field = named[-1][1] if named else None
      if field in _FACTORED_FIELDS:
        return param_path, field, None
      if field not in roles:
        raise ValueError(
            f"enorm cannot tell how to rescale the inner optimizer state field {field!r} "
            f"(state path {'/'.join(names)}). ENorm changes the params, so every "
            "params-shaped buffer must be rescaled: pass state_roles={"
            f"{field!r}: enorm_jax.{_suggested_role(str(field))}}} if that is what it "
            "holds. The roles: FIRST_MOMENT (gradient-like, divided by s), "
            "SECOND_MOMENT (squared gradients, divided by s**2), PARAM_COPY "
            "(parameter values, multiplied by s).")
      return param_path, field, roles[field]
  raise ValueError(f"enorm could not match optimizer state leaf {'/'.join(names)} to a "
                   "parameter path.")


def rescale_optimizer_state(inner: optax.GradientTransformation, inner_state: Any,
                            params: Any, scales: Scales, graph: RescalingGraph,
                            state_roles: Mapping[str, int] = DEFAULT_STATE_ROLES, *,
                            unscaled_paths: Collection[str] = ()) -> Any:
  """Rescales every params-shaped buffer of ``inner_state`` after a rescaling.

  Buffers are found with `optax.tree_utils.tree_map_params` and classified by
  their field name in ``state_roles`` (first moments divided by s, second
  moments by s**2, parameter copies multiplied by s). A params-shaped field
  that is not in ``state_roles`` raises `ValueError`: it is never left
  unscaled. Buffers of the parameters in ``unscaled_paths`` are left as they
  are (`enorm` keeps the biases' state in the unbalanced coordinates with
  ``bias_steps='unbalanced'``).

  Args:
    inner: the optimizer whose state this is.
    inner_state: its state.
    params: the params the scales were applied to (for paths and shapes).
    scales: one factor array per group, as returned by `balance`.
    graph: the `RescalingGraph`.
    state_roles: field name -> power; `DEFAULT_STATE_ROLES` by default.
    unscaled_paths: parameter paths whose buffers are left as they are.

  Returns:
    The rescaled state.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2'])
    >>> tx = optax.adam(1e-3)
    >>> _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> balanced, scales = enorm_jax.balance(params, graph, cycles=5)
    >>> state = enorm_jax.rescale_optimizer_state(tx, state, params, scales, graph)
    >>> bool(jnp.allclose(state[0].nu['layers_0']['kernel'], 0.001 / scales[0] ** 2))
    True

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, eq. (10).
  """
  try:
    is_param = optax.tree_utils.tree_map_params(
        inner, lambda _: True, inner_state, transform_non_params=lambda _: False)
  except Exception as e:  # the inner init inspected its placeholder
    raise ValueError(
        "enorm could not locate the params-shaped buffers of the inner optimizer's "
        "state with optax.tree_utils.tree_map_params (its init must not inspect the "
        f"values or shapes of params). Original error: {e!r}") from e
  params_paths = _params_key_paths(params)
  plan = Plan.build(graph, tree_paths.leaves_by_path(params))
  scales = plan.check_scales(scales)
  flat_state, treedef = jax.tree_util.tree_flatten_with_path(inner_state)
  flags = jax.tree_util.tree_leaves(is_param)
  if len(flags) != len(flat_state):
    raise ValueError("enorm: the inner optimizer's state does not match its init "
                     "structure; was it created by the same transformation?")
  new_leaves = []
  for (key_path, leaf), flag in zip(flat_state, flags):
    if not flag:
      new_leaves.append(leaf)
      continue
    param_path, field, power = _state_role(key_path, params_paths, state_roles)
    if param_path in plan.by_leaf and param_path not in unscaled_paths:
      shape = tuple(plan.shape_of(param_path))
      if power is None:  # a factored moment: only the (1,) placeholder of an unfactored one
        if tuple(leaf.shape) != (1,) or shape == (1,):
          raise ValueError(
              f"enorm cannot rescale the factored second moment {field!r} of parameter "
              f"{param_path!r}: a row and a column mean of g**2 cannot follow per-element "
              "factors exactly. Use optax.adafactor(..., factored=False), or adam.")
        new_leaves.append(leaf)
        continue
      if tuple(leaf.shape) != shape:
        raise ValueError(
            f"enorm: the inner optimizer state field {field!r} holds shape "
            f"{tuple(leaf.shape)} for parameter {param_path!r} of shape {shape}; only "
            "buffers with the parameter's shape can be rescaled.")
      leaf = plan.scale(param_path, leaf.astype(jnp.float32), scales, power).astype(leaf.dtype)
    new_leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def enorm(inner: optax.GradientTransformation, graph: RescalingGraph, *, p: float = 2.0,
          c: float = 1.0, cycles: int = 1, every_k: int = 1, include_biases: bool = False,
          schedule: str = "sequential", bias_steps: str | None = None,
          state_roles: Mapping[str, int] | None = None, check_applied: bool = True
          ) -> optax.GradientTransformationExtraArgs:
  """Equi-normalization after every ``every_k`` steps of ``inner`` (Algorithm 2).

  Each update applies ``inner``'s update to the params, runs `balance` on the
  result, rescales ``inner``'s params-shaped state with the same factors, and
  returns ``balanced - params``. A buffer on a weight that was multiplied by
  ``s`` is divided by ``s`` (first moments: SGD ``trace``, Adam ``mu``,
  ``MultiSteps`` accumulators) or by ``s**2`` (second moments: ``nu``); see
  `DEFAULT_STATE_ROLES`.

  Use it as the outermost transformation, and apply its updates unchanged
  (``optax.apply_updates(params, updates)``); put weight decay, clipping and
  schedules inside ``inner``. Anything applied after it changes
  ``balanced - params`` and so the network's function: with ``check_applied``
  the next update raises when its params are not the ones the last update made.

  Biases and ``c != 1``: at the balance point of ``c > 1`` the middle layers of
  a deep net carry tiny activations, and so tiny biases (a bias is rescaled
  with its unit). An optimizer step of a given size is then huge relative to
  those biases: at depth 15, ``c = 1.2``, biases overtake the input-driven
  signal within 40 SGD steps, units die and the loss overflows. With
  ``bias_steps='unbalanced'`` the inner optimizer steps the biases in the
  coordinates of the network as it would be without any balancing: ``enorm``
  keeps each bias's accumulated factor ``S``, gives ``inner`` the gradient
  ``g * S``, the bias ``b / S`` and bias state that is never rescaled, and
  applies ``S`` times its update. Every parameter is still rescaled with its
  unit, so the function is kept exactly; only the biases' steps change.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.chain(optax.add_decayed_weights(1e-3),
      optax.sgd(lr, momentum=0.9))``.
    graph: the network's `RescalingGraph`.
    p: norm exponent (> 0).
    c: asymmetric scaling (> 0).
    cycles: ENorm cycles per balancing step (>= 1).
    every_k: balance after every ``every_k``-th update (>= 1).
    include_biases: whether biases count in the incoming norm.
    schedule: ``'sequential'`` or ``'parallel'``, as in `balance`.
    bias_steps: ``'balanced'`` (Algorithm 2: every parameter is stepped where it
      is) or ``'unbalanced'`` (biases stepped in the unbalanced coordinates,
      above). ``None`` means ``'balanced'``, with a warning when ``c != 1`` and
      the graph has biases.
    state_roles: field name -> power (``FIRST_MOMENT``, ``SECOND_MOMENT``,
      ``PARAM_COPY``) for params-shaped state fields, merged over
      `DEFAULT_STATE_ROLES`.
    check_applied: keep a fingerprint (sum and sum of squares per rescaled
      leaf) of the params each update makes, and raise at the next update if
      the params differ (the outermost rule above). Costs two reductions over
      the rescaled params per step.

  Returns:
    An `optax.GradientTransformationExtraArgs`. Its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 8)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2'])
    >>> tx = enorm_jax.enorm(optax.sgd(0.1, momentum=0.9), graph)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Stock, Graham, Gribonval and Jégou, `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, Algorithm 2 and eq. (10).
  """
  check_hyperparams(p, c, cycles, schedule)
  if not isinstance(every_k, numbers.Integral) or every_k < 1:
    raise ValueError(f"every_k must be an int >= 1, got every_k={every_k!r}.")
  require_graph(graph)
  bias_paths = tuple(sorted({e.path for g in graph for e in g.biases + g.consumer_biases}))
  if bias_steps is None:
    if c != 1 and bias_paths:
      warnings.warn(
          f"enorm(c={c}) on a graph with biases ({bias_paths[0]!r}, ...): deep nets can "
          "diverge, because biases of tiny-activation layers take huge relative steps. "
          "Pass bias_steps='unbalanced' to step the biases in unbalanced coordinates, or "
          "bias_steps='balanced' to keep Algorithm 2 and silence this warning.",
          stacklevel=2)
    bias_steps = "balanced"
  if bias_steps not in BIAS_STEPS:
    raise ValueError(f"bias_steps must be one of {BIAS_STEPS}, got {bias_steps!r}.")
  if bias_steps == "balanced":
    bias_paths = ()
  for name, power in (state_roles or {}).items():
    if power not in (FIRST_MOMENT, SECOND_MOMENT, PARAM_COPY) or isinstance(power, bool):
      raise ValueError(
          f"state_roles[{name!r}]={power!r} is not a role: use enorm_jax.FIRST_MOMENT (-1, "
          "gradient-like), SECOND_MOMENT (-2) or PARAM_COPY (+1).")
  roles = dict(DEFAULT_STATE_ROLES)
  roles.update(state_roles or {})
  inner = optax.with_extra_args_support(inner)
  checked_paths = tuple(sorted(graph.paths)) if check_applied else ()

  def check_roles_match(inner_state):
    unknown = sorted(set(state_roles or {}) - _field_names(inner_state))
    if unknown:
      raise ValueError(
          f"enorm: state_roles names {unknown}, but the inner optimizer's state has no "
          f"such field (its fields: {sorted(_field_names(inner_state))}). Check the "
          "spelling.")

  def init_fn(params):
    # Placeholder-safe (optax.tree_utils.tree_map_params): only the graph is read.
    inner_state = inner.init(params)
    check_roles_match(inner_state)
    return EnormState(
        count=jnp.zeros([], jnp.int32), inner_state=inner_state,
        unit_scales=tuple(jnp.ones(g.size, jnp.float32) for g in graph) if bias_paths else (),
        applied=jnp.zeros((len(checked_paths), 2), jnp.float32))

  def bias_factors(params, unit_scales):
    """Each bias leaf's accumulated factor S (path -> array of the leaf's shape)."""
    if not unit_scales:
      return {}
    plan = Plan.build(graph, tree_paths.leaves_by_path(params))
    return {path: plan.scale(path, jnp.ones(plan.shape_of(path), jnp.float32), unit_scales)
            for path in bias_paths}

  def times(tree, factors, power):
    """``tree`` with every bias leaf multiplied by its factor**power."""
    if not factors:
      return tree
    return tree_paths.map_with_path_str(
        lambda path, x: x if path not in factors or x is None
        else (x * factors[path] ** power).astype(x.dtype), tree)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("enorm needs the current params: call "
                       "tx.update(grads, state, params).")
    graph.validate(params)  # at trace time: clear errors before anything reads a path
    checked = outermost.check_unchanged(state.applied, params, checked_paths,
                                       active=state.count > 0)
    unit_scales = state.unit_scales
    factors = bias_factors(params, unit_scales)
    inner_updates, inner_state = inner.update(
        times(updates, factors, 1), state.inner_state, times(params, factors, -1),
        **extra_args)
    stepped = optax.apply_updates(params, times(inner_updates, factors, 1))
    count = optax.safe_increment(state.count)

    def balanced(operand):
      stepped, inner_state, unit_scales = operand
      new_params, scales = balance(stepped, graph, p=p, c=c, cycles=cycles,
                                   include_biases=include_biases, schedule=schedule)
      inner_state = rescale_optimizer_state(inner, inner_state, stepped, scales, graph,
                                            roles, unscaled_paths=bias_paths)
      unit_scales = tuple(u * s for u, s in zip(unit_scales, scales))
      return new_params, inner_state, unit_scales

    operand = (stepped, inner_state, unit_scales)
    if every_k == 1:
      new_params, inner_state, unit_scales = balanced(operand)
    else:
      new_params, inner_state, unit_scales = lax.cond(count % every_k == 0, balanced,
                                                      lambda x: x, operand)
    # The updates depend on the check (NaN where it failed; it raises first): so every
    # read of the old params precedes the in-place write of donated params, with no copy.
    new_updates = jax.tree.map(lambda new, old: jnp.where(checked, new - old, jnp.nan)
                               .astype(old.dtype) if hasattr(old, "dtype") else new,
                               new_params, params)
    return new_updates, EnormState(count=count, inner_state=inner_state,
                                   unit_scales=unit_scales,
                                   applied=outermost.fingerprint(new_params, checked_paths))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
