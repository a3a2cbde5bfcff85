"""The paper's other baselines: Path-SGD and implicit ENorm (ENorm-Impl)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from enorm_jax.balance import check_hyperparams, energy, rescale_tree
from enorm_jax.graph import RescalingGraph, require_graph


def path_norm_scaling(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                      example_input: jax.Array) -> Any:
  """Per-weight Path-SGD scaling ``kappa_e = gamma_in(e)^2 * gamma_out(e)^2``.

  Feeding ones through the network with every weight squared makes every
  pre-activation non-negative, so ReLU acts as the identity and the summed
  output is the squared path norm ``pi(v)`` at ``v = w^2``. Its gradient with
  respect to ``v`` is kappa, in one backward pass. ``apply_fn(params, x)`` must
  be a ReLU network without normalization layers (biases are treated as
  weights from a constant unit).

  Args:
    apply_fn: ``apply_fn(params, x)``, the network (same order as `check_graph`).
    params: its parameters.
    example_input: an input of the right shape (its values are not used).

  Returns:
    A params-shaped tree of kappa values.

  Example:
    >>> import jax.numpy as jnp, enorm_jax
    >>> params = {'a': jnp.full((2, 3), 2.0), 'b': jnp.full((3, 1), 1.0)}
    >>> apply = lambda p, x: jnp.maximum(x @ p['a'], 0) @ p['b']
    >>> kappa = enorm_jax.contrib.path_norm_scaling(apply, params, jnp.ones((1, 2)))
    >>> kappa['a'][0, 0].item(), kappa['b'][0, 0].item()  # paths through a[0,0]; into b[0,0]
    (1.0, 8.0)

  References:
    Neyshabur, Salakhutdinov and Srebro, `Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks <https://arxiv.org/abs/1506.02617>`_,
    NeurIPS 2015.
  """
  squared = jax.tree.map(jnp.square, params)
  ones = jnp.ones_like(example_input)
  return jax.grad(lambda v: jnp.sum(apply_fn(v, ones)))(squared)


class ScaleByPathNormState(NamedTuple):
  """`scale_by_path_norm` is stateless."""


def scale_by_path_norm(apply_fn: Callable[[Any, jax.Array], jax.Array],
                       example_input: jax.Array) -> optax.GradientTransformationExtraArgs:
  """Divides each update by its Path-SGD scaling kappa (see `path_norm_scaling`).

  Where kappa is not positive and finite (a weight on no live path) the
  update passes through unchanged.

  Args:
    apply_fn: ``apply_fn(params, x)``, a ReLU network without normalization.
    example_input: an input of the right shape.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, enorm_jax
    >>> params = {'a': jnp.full((2, 3), 2.0), 'b': jnp.full((3, 1), 1.0)}
    >>> apply = lambda p, x: jnp.maximum(x @ p['a'], 0) @ p['b']
    >>> tx = enorm_jax.contrib.scale_by_path_norm(apply, jnp.ones((1, 2)))
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> updates['b'][0, 0].item()  # 1 / kappa
    0.125

  References:
    Neyshabur, Salakhutdinov and Srebro, `Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks <https://arxiv.org/abs/1506.02617>`_,
    NeurIPS 2015.
  """

  def init_fn(params):
    del params
    return ScaleByPathNormState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_path_norm needs params: call tx.update(grads, state, params).")
    kappa = path_norm_scaling(apply_fn, params, example_input)
    ok = lambda k: (k > 0) & jnp.isfinite(k)
    updates = jax.tree.map(lambda u, k: jnp.where(ok(k), u / jnp.where(ok(k), k, 1.0), u)
                           .astype(u.dtype), updates, kappa)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def path_sgd(learning_rate: optax.ScalarOrSchedule,
             apply_fn: Callable[[Any, jax.Array], jax.Array],
             example_input: jax.Array) -> optax.GradientTransformationExtraArgs:
  """Path-SGD: ``w <- w - lr * (dL/dw) / kappa_w``.

  Args:
    learning_rate: a float or an optax schedule.
    apply_fn: ``apply_fn(params, x)``, a ReLU network without normalization
      layers or max-pooling.
    example_input: an input of the right shape.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import enorm_jax
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((1, 4))
    >>> params = mlp.init(jax.random.key(0), x)['params']
    >>> tx = enorm_jax.contrib.path_sgd(0.1, lambda p, x: mlp.apply({'params': p}, x), x)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)

  References:
    Neyshabur, Salakhutdinov and Srebro, `Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks <https://arxiv.org/abs/1506.02617>`_,
    NeurIPS 2015.
  """
  return optax.chain(scale_by_path_norm(apply_fn, example_input), optax.sgd(learning_rate))


def init_log_scales(graph: RescalingGraph) -> tuple[jax.Array, ...]:
  """ENorm-Impl's learnable log-scales: one zero per hidden unit (factors of 1).

  Args:
    graph: the `RescalingGraph`.

  Returns:
    One float32 array of zeros per group, of the group's size.

  Example:
    >>> import jax.numpy as jnp, enorm_jax
    >>> params = {'a': {'kernel': jnp.ones((2, 3))}, 'b': {'kernel': jnp.ones((3, 1))}}
    >>> [s.shape for s in enorm_jax.contrib.init_log_scales(enorm_jax.chain_graph(params, ['a', 'b']))]
    [(3,)]

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, Appendix C.
  """
  return tuple(jnp.zeros((g.size,), jnp.float32) for g in require_graph(graph))


def implicit_energy(params: Any, log_scales: tuple[jax.Array, ...], graph: RescalingGraph,
                    *, p: float = 2.0, c: float = 1.0, include_biases: bool = False
                    ) -> jax.Array:
  """ENorm-Impl's regularizer: the energy of ``params`` rescaled by ``exp(log_scales)``.

  Train ``(params, log_scales)`` on ``loss(params) + lambda * implicit_energy(...)``;
  the network itself is evaluated at ``params`` (rescaling does not change it),
  so the log-scales get gradient only from this term.

  Args:
    params: the parameter pytree.
    log_scales: one log-factor array per group (`init_log_scales`).
    graph: the `RescalingGraph`.
    p: the norm exponent, > 0.
    c: the asymmetric scaling factor, > 0.
    include_biases: whether the producers' biases count.

  Returns:
    The energy of the rescaled params, a differentiable float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp, enorm_jax
    >>> params = {'a': {'kernel': jnp.full((2, 3), 2.0)}, 'b': {'kernel': jnp.ones((3, 1))}}
    >>> graph = enorm_jax.chain_graph(params, ['a', 'b'])
    >>> log_scales = enorm_jax.contrib.init_log_scales(graph)
    >>> float(enorm_jax.contrib.implicit_energy(params, log_scales, graph))
    27.0
    >>> grads = jax.grad(enorm_jax.contrib.implicit_energy, argnums=1)(params, log_scales, graph)
    >>> grads[0].tolist()  # d/d(delta) of 8 e^(2 delta) + e^(-2 delta) at 0: 16 - 2
    [14.0, 14.0, 14.0]

  References:
    Stock et al., `Equi-normalization of Neural Networks
    <https://arxiv.org/abs/1902.10416>`_, ICLR 2019, Appendix C.
  """
  check_hyperparams(p, c)
  # A differentiated regularizer, not a write-back: no need for exact division.
  scaled = rescale_tree(params, tuple(jnp.exp(s) for s in log_scales), graph, exact=False)
  return energy(scaled, graph, p=p, c=c, include_biases=include_biases)
