"""Optimizer state under a rescaling: which buffers move, and how.

When a parameter element is multiplied by ``s``, a buffer of the optimizer state
on it transforms as ``s**power``: first moments (gradient-like) by ``1/s``,
second moments by ``1/s**2``, parameter copies by ``s``. `rescale_optimizer_state`
finds the params-shaped buffers of any optax state and applies the power that
its field name has in `DEFAULT_STATE_ROLES` (or the caller's ``state_roles``).
"""

from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enorm_jax import _paths
from enorm_jax._plan import Plan, Scales
from enorm_jax.balance import FIRST_MOMENT, PARAM_COPY, SECOND_MOMENT
from enorm_jax.graph import RescalingGraph

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


def measured_role(inner: optax.GradientTransformation, params: Any,
                  state_key_path: tuple[Any, ...]) -> str | None:
  """The role of the state leaf at ``state_key_path``, measured, or ``None``.

  The optimizer takes one step from its init at random (params, grads) and one
  at (2 params, grads / 2), which is the same point after a rescaling by 2. The
  leaf's ratio between the two runs is 2 for a parameter copy, 1/2 for a first
  moment and 1/4 for a second moment; anything else (a buffer mixing gradients
  and params, like a momentum of decayed gradients) is not a single role.
  """
  def draw(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, np.shape(x)), x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  try:
    with jax.ensure_compile_time_eval():
      p, g = draw(0), draw(1)
      runs = [inner.update(g_, inner.init(p_), p_)[1] for p_, g_ in (
          (p, g), (jax.tree.map(lambda x: x * 2, p), jax.tree.map(lambda x: x / 2, g)))]
      a, b = (np.asarray(_leaf_at(r, state_key_path), np.float64) for r in runs)
  except Exception:  # pylint: disable=broad-except  (an optimizer we cannot run alone)
    return None
  if a.shape != b.shape or not np.all(np.isfinite(a) & np.isfinite(b)) or not np.any(a):
    return None
  for power, name in ((1, "PARAM_COPY"), (-1, "FIRST_MOMENT"), (-2, "SECOND_MOMENT")):
    if np.allclose(b, a * 2.0 ** power, rtol=1e-3, atol=0):
      return name
  return None


def _leaf_at(tree: Any, key_path: tuple[Any, ...]) -> Any:
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if tuple(leaf_path) == tuple(key_path):
      return leaf
  raise KeyError(key_path)


def _params_key_paths(params: Any) -> set[tuple[str, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {tuple(_paths.key_name(k) for k in kp) for kp, _ in flat}


def _state_role(key_path: tuple[Any, ...], params_paths, roles: Mapping[str, int],
                inner: optax.GradientTransformation, params: Any):
  """(param path, field name, power) of a params-shaped state leaf."""
  names = tuple(_paths.key_name(k) for k in key_path)
  for start in range(len(names)):
    if names[start:] in params_paths:
      param_path = _paths.key_path_str(key_path[start:])
      named = [(k, n) for k, n in zip(key_path[:start], names[:start])
               if not isinstance(k, jax.tree_util.SequenceKey)]
      field = named[-1][1] if named else None
      if field in _FACTORED_FIELDS:
        return param_path, field, None
      if field not in roles:
        raise ValueError(_unknown_field_message(field, names, inner, params, key_path))
      return param_path, field, roles[field]
  raise ValueError(f"enorm could not match optimizer state leaf {'/'.join(names)} to a "
                   "parameter path.")


def _unknown_field_message(field, names, inner, params, key_path) -> str:
  role = measured_role(inner, params, key_path)
  if role is not None:
    hint = (f"Measured on a probe step (params x2, grads / 2), it holds a {role}: pass "
            f"state_roles={{{field!r}: enorm_jax.{role}}}.")
  else:
    hint = ("A probe step (params x2, grads / 2) could not show its role (it may mix "
            "gradients and params, or the optimizer cannot run alone). Find what it holds "
            "in the optimizer's code, then pass state_roles={"
            f"{field!r}: <role>}}.")
  return (f"enorm cannot tell how to rescale the inner optimizer state field {field!r} "
          f"(state path {'/'.join(names)}). ENorm changes the params, so every "
          f"params-shaped buffer must be rescaled. {hint} The roles: "
          "enorm_jax.FIRST_MOMENT (gradient-like, divided by s), SECOND_MOMENT (squared "
          "gradients, divided by s**2), PARAM_COPY (parameter values, multiplied by s).")


def check_state_roles(state_roles: Mapping[str, int] | None) -> dict[str, int]:
  """`DEFAULT_STATE_ROLES` updated with ``state_roles``, each checked to be a role."""
  for name, power in (state_roles or {}).items():
    if power not in (FIRST_MOMENT, SECOND_MOMENT, PARAM_COPY) or isinstance(power, bool):
      raise ValueError(
          f"state_roles[{name!r}]={power!r} is not a role: use enorm_jax.FIRST_MOMENT (-1, "
          "gradient-like), SECOND_MOMENT (-2) or PARAM_COPY (+1).")
  return {**DEFAULT_STATE_ROLES, **(state_roles or {})}


def check_fields_exist(state_roles: Mapping[str, int] | None, inner_state: Any) -> None:
  """Raises if ``state_roles`` names a field the inner state does not have."""
  unknown = sorted(set(state_roles or {}) - _field_names(inner_state))
  if unknown:
    raise ValueError(
        f"enorm: state_roles names {unknown}, but the inner optimizer's state has no "
        f"such field (its fields: {sorted(_field_names(inner_state))}). Check the "
        "spelling.")


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
    >>> import jax, jax.numpy as jnp, optax, enorm_jax
    >>> params = {'a': {'kernel': jnp.full((3, 4), 2.0)}, 'b': {'kernel': jnp.ones((4, 2))}}
    >>> graph = enorm_jax.chain_graph(params, ['a', 'b'])
    >>> tx = optax.adam(1e-3)
    >>> _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> state = enorm_jax.rescale_optimizer_state(tx, state, params, [jnp.full(4, 0.5)], graph)
    >>> float(state[0].nu['a']['kernel'][0, 0])  # (1 - 0.999) * 1**2 / 0.5**2
    0.004...

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
        "state with optax.tree_utils.tree_map_params, which runs its init on "
        "placeholders: the init must not inspect the values or shapes of params. With "
        "optax.multi_transform (or masked), pass the labels (mask) as a pytree, not as a "
        f"function of the params. Original error: {e!r}") from e
  params_paths = _params_key_paths(params)
  plan = Plan.build(graph, _paths.leaves_by_path(params))
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
    param_path, field, power = _state_role(key_path, params_paths, state_roles, inner, params)
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
      leaf = plan.scale(param_path, leaf.astype(jnp.float32), scales, power,
                        shifted=power == 1).astype(leaf.dtype)  # copies of offset gains
    new_leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, new_leaves)
