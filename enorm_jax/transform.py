"""`enorm`: an optax wrapper that balances the params after every inner step."""

import dataclasses
import numbers
import warnings
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from enorm_jax import _frozen, _outermost, _paths
from enorm_jax._plan import Plan
from enorm_jax.balance import balance, check_hyperparams, rescale
from enorm_jax.graph import RescalingGraph, require_graph
from enorm_jax.optimizer_state import (check_fields_exist, check_state_roles,
                                       rescale_optimizer_state)

BIAS_STEPS = ("balanced", "unbalanced")


class EnormState(NamedTuple):
  """State of `enorm`.

  Attributes:
    enorm_count: int32, the number of updates so far.
    inner_state: the inner optimizer's state.
    scales: per group of the graph, the float32 factors the last update applied
      (ones where it did not balance); `rescale` moves a copy of the params
      (an EMA) into the new coordinates with them.
    unit_scales: with ``bias_steps='unbalanced'``, each group's accumulated
      factors since the start of training.
    applied: with ``check_applied``, a fingerprint of the params the last update
      made (float32 ``[sum, sum of squares]`` per rescaled leaf).
    mismatched: with ``check_applied``, per rescaled leaf, whether an update
      found it changed since the update before (`raise_if_misapplied` names them).
  """

  enorm_count: jax.Array
  inner_state: Any
  scales: tuple = ()
  unit_scales: tuple = ()
  applied: Any = ()
  mismatched: Any = ()


@dataclasses.dataclass(frozen=True)
class _Settings:
  """`enorm`'s checked arguments."""

  graph: RescalingGraph
  p: Any
  c: Any
  cycles: int
  every_k: int
  include_biases: bool
  schedule: str
  bias_paths: tuple[str, ...]  # biases stepped in unbalanced coordinates
  roles: Mapping[str, int]
  frozen: frozenset[str] | None  # None: detected from the inner update
  checked_paths: tuple[str, ...]  # leaves fingerprinted by the outermost check
  raise_in_step: bool  # check_applied=True: raise from inside the step


def enorm(inner: optax.GradientTransformation, graph: RescalingGraph, *, p: float = 2.0,
          c: float = 1.0, cycles: int = 1, every_k: int = 1, include_biases: bool = False,
          schedule: str = "sequential", bias_steps: str | None = None,
          state_roles: Mapping[str, int] | None = None, frozen: Collection[str] | None = None,
          check_applied: bool | str = True) -> optax.GradientTransformationExtraArgs:
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
  the next update raises (or, with ``'record'``, returns NaN updates) when its
  params are not the ones the last update made.

  Frozen parameters: a parameter whose inner update is zero whatever its
  inputs (``optax.set_to_zero()`` through ``multi_transform``, a last
  ``optax.freeze`` in a chain, a ``masked`` zero branch) keeps its values: every
  group that touches it is left out of the balance, with a warning that names
  the groups. Zeros fed to a stateful optimizer (``chain(freeze(mask), adam)``)
  are not provably zero updates, so they are not detected: put the freeze last,
  or list the paths in ``frozen``, which replaces the detection (``frozen=()``:
  rescale every parameter, trained or not).

  Copies of the params outside the optimizer state (an EMA, a teacher network)
  must follow every rescaling to keep computing the same function: the state's
  ``scales`` holds the factors the last update applied, so
  ``ema = enorm_jax.rescale(ema, state.scales, graph)`` before averaging. With
  ``optax.lookahead`` as the inner optimizer (params ``LookaheadParams``), the
  fast params are balanced and the slow ones move with them.

  Biases and ``c != 1``: at the balance point of ``c > 1`` the middle layers of
  a deep net carry tiny activations, and so tiny biases (a bias is rescaled
  with its unit), and an optimizer step is huge relative to them. With
  ``bias_steps='unbalanced'`` the inner optimizer steps the biases in the
  coordinates of the network as it would be without any balancing: ``enorm``
  keeps each bias's accumulated factor ``S``, gives ``inner`` the gradient
  ``g * S``, the bias ``b / S`` and bias state that is never rescaled, and
  applies ``S`` times its update. Every parameter is still rescaled with its
  unit, so the function is kept exactly; only the biases' steps change.

  Low-precision params (bfloat16, float16) get float32 updates, so that
  ``optax.apply_updates`` lands on the balanced params, rounded once.

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
    frozen: ``None`` to detect the parameters ``inner`` never moves and keep
      them, or the '/'-joined paths of the parameters to keep (no detection).
    check_applied: keep a fingerprint (sum and sum of squares per rescaled
      leaf) of the params each update makes and compare the next update's
      params with it (the outermost rule above; two reductions over the
      rescaled params per step). ``True``: a mismatch raises from inside the
      step, through a conditional host callback. ``'record'``: no control flow
      in the step (the raising one costs 5-13 % of a small model's step on
      XLA:CPU, `benchmarks.lm_step`); a mismatch makes the updates NaN and is
      recorded in the state, and `raise_if_misapplied` raises the same error
      on the host (call it when the loss turns non-finite). ``False``: no check.

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
  settings = _check_settings(graph, p, c, cycles, every_k, include_biases, schedule,
                             bias_steps, state_roles, frozen, check_applied)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # Placeholder-safe (optax.tree_utils.tree_map_params): only the graph is read.
    inner_state = inner.init(params)
    check_fields_exist(state_roles, inner_state)
    ones = tuple(jnp.ones(g.size, jnp.float32) for g in graph)
    return EnormState(enorm_count=jnp.zeros([], jnp.int32), inner_state=inner_state,
                      scales=ones, unit_scales=ones if settings.bias_paths else (),
                      applied=jnp.zeros((len(settings.checked_paths), 2), jnp.float32),
                      mismatched=jnp.zeros((len(settings.checked_paths),), jnp.bool_))

  def update_fn(updates, state, params=None, **extra_args):
    _check_call(state, params, settings)
    lookahead = isinstance(params, optax.LookaheadParams)
    fast = params.fast if lookahead else params  # the net; lookahead's slow: a copy
    graph.validate(fast)  # at trace time: clear errors before anything reads a path
    changed = _outermost.changed_leaves(state.applied, fast, settings.checked_paths,
                                        active=state.enorm_count > 0)
    checked = ~jnp.any(changed)
    if settings.raise_in_step:
      checked = checked & _outermost.raise_in_step(changed, settings.checked_paths)
    active = _active_groups(settings, inner, updates, state.inner_state, params, extra_args)
    stepped, inner_state = _inner_step(settings, inner, updates, state, params, extra_args)
    count = optax.safe_increment(state.enorm_count)
    new_fast, inner_state, scales, unit_scales = _balance_step(
        settings, inner, active, count, stepped.fast if lookahead else stepped, inner_state,
        state.unit_scales)
    new_params = optax.LookaheadParams(
        fast=new_fast, slow=rescale(stepped.slow, scales, graph)) if lookahead else new_fast
    return _updates(new_params, params, checked), EnormState(
        enorm_count=count, inner_state=inner_state, scales=scales, unit_scales=unit_scales,
        applied=_outermost.fingerprint(new_fast, settings.checked_paths),
        mismatched=state.mismatched | changed)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_settings(graph, p, c, cycles, every_k, include_biases, schedule, bias_steps,
                    state_roles, frozen, check_applied) -> _Settings:
  check_hyperparams(p, c, cycles, schedule)
  if not isinstance(every_k, numbers.Integral) or every_k < 1:
    raise ValueError(f"every_k must be an int >= 1, got every_k={every_k!r}.")
  require_graph(graph)
  if isinstance(frozen, str):
    raise TypeError(f"frozen must be a collection of parameter paths, got the string "
                    f"{frozen!r}: pass [{frozen!r}].")
  if not (isinstance(check_applied, bool) or check_applied == "record"):
    raise ValueError(f"check_applied must be True, False or 'record', got {check_applied!r}.")
  bias_paths = tuple(sorted({e.path for g in graph for e in g.biases + g.consumer_biases}))
  if bias_steps is None:
    if c != 1 and bias_paths:
      warnings.warn(
          f"enorm(c={c}) on a graph with biases ({bias_paths[0]!r}, ...): deep nets can "
          "diverge, because biases of tiny-activation layers take huge relative steps. "
          "Pass bias_steps='unbalanced' to step the biases in unbalanced coordinates, or "
          "bias_steps='balanced' to keep Algorithm 2 and silence this warning.",
          stacklevel=3)
    bias_steps = "balanced"
  if bias_steps not in BIAS_STEPS:
    raise ValueError(f"bias_steps must be one of {BIAS_STEPS}, got {bias_steps!r}.")
  return _Settings(
      graph=graph, p=p, c=c, cycles=cycles, every_k=every_k, include_biases=include_biases,
      schedule=schedule, bias_paths=bias_paths if bias_steps == "unbalanced" else (),
      roles=check_state_roles(state_roles),
      frozen=None if frozen is None else frozenset(frozen),
      checked_paths=_checked_paths(graph) if check_applied else (),
      raise_in_step=check_applied is True)


def _checked_paths(graph: RescalingGraph) -> tuple[str, ...]:
  """The leaves `enorm`'s outermost check fingerprints, in the state's order."""
  return tuple(sorted(graph.paths))


def raise_if_misapplied(opt_state: Any, graph: RescalingGraph) -> None:
  """Raises the outermost-check error if an `enorm` update in ``opt_state`` found its
  params changed behind its back (``check_applied='record'`` returns NaN updates then).

  Call it outside jit, for example when the loss turns non-finite. ``opt_state``
  may hold `EnormState`s anywhere (chains, `vmap` ensembles with leading axes).

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 8)))['params']
    >>> graph = enorm_jax.chain_graph(params, ['layers_0', 'layers_2'])
    >>> tx = optax.chain(enorm_jax.enorm(optax.sgd(0.1), graph, check_applied='record'),
    ...                  optax.scale(0.5))  # wrong: enorm must be outermost
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> try:
    ...   enorm_jax.raise_if_misapplied(state, graph)
    ... except ValueError as e:
    ...   print(str(e)[:45])
    enorm: the params of this update are not thos
  """
  paths = _checked_paths(graph)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EnormState))
            if isinstance(s, EnormState)]
  for state in states:
    flags = np.asarray(jax.device_get(state.mismatched))
    if flags.size == 0:
      continue  # check_applied=False
    if flags.shape[-1] != len(paths):
      raise ValueError(f"raise_if_misapplied: the state checks {flags.shape[-1]} leaves, the "
                       f"graph has {len(paths)}: pass the graph given to enorm.")
    _outermost.raise_changed(flags, paths)


def _check_call(state, params, settings) -> None:
  if params is None:
    raise ValueError("enorm needs the current params: call tx.update(grads, state, params).")
  if isinstance(params, optax.LookaheadParams) and settings.bias_paths:
    raise ValueError("enorm(bias_steps='unbalanced') does not support optax.lookahead's "
                     "params; use bias_steps='balanced'.")
  if not isinstance(state, EnormState):
    raise TypeError(
        f"enorm's update got a state of type {type(state).__name__}, not an EnormState. "
        "A checkpoint restored without a target gives plain dicts and lists: restore the "
        "optimizer state with the structure of tx.init(params) as its target (orbax: "
        "ocp.args.StandardRestore(jax.eval_shape(tx.init, params))).")


def _active_groups(settings, inner, updates, inner_state, params, extra_args
                   ) -> tuple[int, ...]:
  """Indices of the groups to balance: those touching no frozen parameter."""
  frozen = settings.frozen
  if frozen is None:
    frozen = _frozen.zero_update_paths(inner, updates, inner_state, params, extra_args)
    if isinstance(params, optax.LookaheadParams):  # the fast params are the net
      frozen = frozenset(p.removeprefix("fast/") for p in frozen if p.startswith("fast/"))
  if isinstance(params, optax.LookaheadParams):
    params = params.fast
  unknown = frozen - set(_paths.leaves_by_path(params))
  if unknown:
    raise ValueError(f"enorm(frozen=...) names {_paths.describe_paths(unknown, 4)}, which "
                     "are not parameter paths. Paths are '/'-joined keys of the params "
                     "(enorm_jax.leaves_by_path(params) lists them).")
  active = tuple(i for i, g in enumerate(settings.graph)
                 if not frozen & set(g.scaled_paths()))
  if len(active) < len(settings.graph):
    left_out = [g.label for i, g in enumerate(settings.graph) if i not in active]
    warnings.warn(
        f"enorm: {_paths.describe_paths(frozen & settings.graph.paths, 4)} keep their "
        "values (frozen: their inner updates are always zero, or `frozen` lists them), so "
        f"the {len(left_out)} group(s) touching them are left out of the balance: "
        f"{', '.join(left_out[:6])}{', ...' if len(left_out) > 6 else ''}.", stacklevel=4)
  return active


def _times(tree, factors, power):
  """``tree`` with every bias leaf in ``factors`` multiplied by its factor**power."""
  if not factors:
    return tree
  return _paths.map_with_path_str(
      lambda path, x: x if path not in factors or x is None
      else (x * factors[path] ** power).astype(x.dtype), tree)


def _inner_step(settings, inner, updates, state, params, extra_args):
  """The params after one step of ``inner``, and its new state.

  With ``bias_steps='unbalanced'`` the biases are stepped in the coordinates of
  the never-balanced net: gradient times ``S``, bias divided by ``S``, and the
  step multiplied by ``S`` again (``S``: the bias's accumulated factor).
  """
  factors = {}
  if settings.bias_paths:
    plan = Plan.build(settings.graph, _paths.leaves_by_path(params))
    factors = {path: plan.scale(path, jnp.ones(plan.shape_of(path), jnp.float32),
                                state.unit_scales) for path in settings.bias_paths}
  inner_updates, inner_state = inner.update(
      _times(updates, factors, 1), state.inner_state, _times(params, factors, -1),
      **extra_args)
  return optax.apply_updates(params, _times(inner_updates, factors, 1)), inner_state


def _balance_step(settings, inner, active, count, stepped, inner_state, unit_scales):
  """Balances ``stepped`` on the ``active`` groups (every ``every_k`` updates) and
  rescales the inner state: ``(params, inner state, scales, unit scales)``."""
  graph = settings.graph.subgraph(active)
  ones = tuple(jnp.ones(g.size, jnp.float32) for g in settings.graph)

  def balanced(operand):
    stepped, inner_state, unit_scales = operand
    new_params, scales = balance(stepped, graph, p=settings.p, c=settings.c,
                                 cycles=settings.cycles, include_biases=settings.include_biases,
                                 schedule=settings.schedule)
    inner_state = rescale_optimizer_state(inner, inner_state, stepped, scales, graph,
                                          settings.roles, unscaled_paths=settings.bias_paths)
    all_scales = list(ones)
    for i, s in zip(active, scales):
      all_scales[i] = s
    unit_scales = tuple(u * s for u, s in zip(unit_scales, all_scales))
    return new_params, inner_state, tuple(all_scales), unit_scales

  operand = (stepped, inner_state, unit_scales)
  if not active:
    return stepped, inner_state, ones, unit_scales
  if settings.every_k == 1:
    return balanced(operand)
  return lax.cond(count % settings.every_k == 0, balanced,
                  lambda x: (*x[:2], ones, x[2]), operand)


def _updates(new_params, params, checked):
  """``new_params - params``: float32 for low-precision leaves, so that
  ``apply_updates`` lands on ``new_params``; NaN where the outermost check failed.

  The updates depend on the check (it raises first), so every read of the old
  params precedes the in-place write of donated params, with no copy.
  """
  def update(new, old):
    if not hasattr(old, "dtype"):
      return new
    dtype = old.dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      dtype = jnp.float32
    diff = new.astype(dtype) - old.astype(dtype)
    return jnp.where(checked, diff, jnp.nan).astype(dtype)
  return jax.tree.map(update, new_params, params)
