"""The tracer's value tags, its state and its rule table.

The tracer interprets a jaxpr abstractly (`enorm_jax.tracing._interpreter`).
Every value carries a *tag* that says how it depends on hidden-unit scalings:

* `Scaled`: element ``i`` is multiplied by ``d[units[i]]`` when the units are
  rescaled (``units[i] = -1``: not scaled). Created at the output channels of
  every contraction whose kernel is a parameter, and at a norm's gain.
* `ParamView`: element ``i`` is ``leaf[index[i]] + shift`` of one parameter
  (reshaped, broadcast, ...; ``index[i] = -1``: none), possibly times unscaled
  factors.
* `ACTIVATION`: an unscaled value that depends on the function's inputs (a
  normalized activation, the embedded tokens).
* a ``np.ndarray``: a known constant; ``None``: any other value (e.g. computed
  from parameters or closed-over arrays only).

A rule (one per primitive, in `_RULES`) maps the input tags of one equation to
its output tags and records events on the `TraceState`: ``record`` a parameter
slice that produces, consumes or carries units; ``union`` units that must share
a factor (or take inverse factors); ``stop`` units; ``taint`` a parameter. It
raises `TraceStop` when the op does not commute with positive per-unit scaling.
Events name the equation being interpreted, which the interpreter sets with
`TraceState.visiting`. `register_rule` adds a rule for a primitive.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

UNSCALED = -1


@dataclasses.dataclass
class Scaled:
  units: np.ndarray  # int64, shape of the value; -1 where not scaled


class _Activation:
  def __repr__(self):
    return "ACTIVATION"


ACTIVATION = _Activation()


@dataclasses.dataclass
class ParamView:
  path: str
  index: np.ndarray  # int64, shape of the value: flat index into the leaf, -1: none
  shift: float = 0.0  # the value is leaf + shift (an offset gain, Gemma's 1 + scale)


class TraceStop(Exception):
  """Raised by a rule: the op does not commute with scaling of its scaled inputs."""


def shape_of(var) -> tuple[int, ...]:
  """The shape of a jaxpr variable."""
  return tuple(var.aval.shape)


def is_const(tag, pred) -> bool:
  """Whether ``tag`` is a known constant for which ``pred`` holds."""
  return isinstance(tag, np.ndarray) and bool(pred(tag))


def max_reads(index: np.ndarray) -> int:
  """How often the most-read leaf element appears in a `ParamView` index (0: none).

  1 means a full view (a reshaped, transposed, sliced or padded kernel); more
  means a broadcast or repeated one (a norm gain over positions).
  """
  used = np.asarray(index)[np.asarray(index) >= 0]
  return int(np.bincount(used).max()) if used.size else 0


class TraceState:
  """State of one abstract interpretation: unit union-find, events and reasons."""

  def __init__(self, leaf_shapes: dict[str, tuple[int, ...]]):
    self.leaf_shapes = leaf_shapes
    self.next_unit = 0
    self.parent: dict[int, int] = {}
    self.parity: dict[int, int] = {}  # relative to the parent (see `union`)
    # (role, path) -> unit of each leaf element (-1: none), in order of first use.
    self.leaf_units: dict[tuple[str, str], np.ndarray] = {}
    self.leaf_shifts: dict[str, float] = {}  # path -> the offset it is recorded with
    self.unit_producer: dict[int, str] = {}
    self.stopped: dict[int, str] = {}
    self.tainted: dict[str, str] = {}
    self._location = ""
    self._where = "an unknown location"

  @property
  def where(self) -> str:
    """The source line of the equation being interpreted."""
    return self._where

  @contextlib.contextmanager
  def visiting(self, primitive: str, where: str) -> Iterator[None]:
    """Events recorded inside name this equation: ``[primitive] at where``."""
    saved = self._location, self._where
    self._location, self._where = f"[{primitive}] at {where}", where
    try:
      yield
    finally:
      self._location, self._where = saved

  # --- units -------------------------------------------------------------
  def new_units(self, n: int, producer: str) -> np.ndarray:
    units = np.arange(self.next_unit, self.next_unit + n, dtype=np.int64)
    for u in units:
      self.parent[int(u)] = int(u)
      self.parity[int(u)] = 0
      self.unit_producer[int(u)] = producer
    self.next_unit += n
    return units

  def find(self, u: int) -> int:
    return self._find(u)[0]

  def _find(self, u: int) -> tuple[int, int]:
    """(root, parity): parity 1 means ``d[u] = 1 / d[root]``."""
    path = []
    while self.parent[u] != u:
      path.append(u)
      u = self.parent[u]
    root, acc = u, 0
    for v in reversed(path):  # compress: parity of v relative to the root
      acc ^= self.parity[v]
      self.parent[v], self.parity[v] = root, acc
    return (root, self.parity[path[0]]) if path else (root, 0)

  def union(self, a: np.ndarray, b: np.ndarray, inverse: bool = False) -> None:
    """Ties ``d[a] = d[b]`` elementwise (``d[a] = 1 / d[b]`` with ``inverse``)."""
    a, b = np.ravel(a), np.ravel(b)
    differ = (a != b) | inverse
    if not differ.any():
      return
    base = self.next_unit + 1
    keys = np.unique(a[differ] * base + b[differ])
    for x, y in zip((keys // base).tolist(), (keys % base).tolist()):
      (rx, px), (ry, py) = self._find(x), self._find(y)
      want = px ^ py ^ int(inverse)  # parity of rx relative to ry
      if rx == ry:
        if want:
          self.stopped.setdefault(rx, f"tied to its own inverse {self._location}")
        continue
      child, root = max(rx, ry), min(rx, ry)
      self.parent[child], self.parity[child] = root, want

  def roots(self) -> np.ndarray:
    """Lookup table: unit -> its class representative."""
    return np.array([self.find(u) for u in range(self.next_unit)], np.int64)

  def parities(self) -> np.ndarray:
    """Lookup table: unit -> 1 if its factor is the inverse of its representative's."""
    return np.array([self._find(u)[1] for u in range(self.next_unit)], np.int64)

  def stop(self, units: np.ndarray, reason: str) -> None:
    for u in np.unique(units[units >= 0]).tolist():
      self.stopped.setdefault(int(u), f"{reason} {self._location}")

  def all_stopped(self, units: np.ndarray) -> bool:
    """Whether every scaled element of ``units`` belongs to a stopped class (such a
    value is never rescaled: it acts as an unscaled one)."""
    used = np.unique(units[units >= 0])
    stopped_roots = {self.find(u) for u in self.stopped}
    return bool(used.size) and all(self.find(int(u)) in stopped_roots for u in used)

  def taint(self, path: str, reason: str) -> None:
    self.tainted.setdefault(path, f"{reason} {self._location}")

  # --- events ------------------------------------------------------------
  def record(self, role: str, view: ParamView, units: np.ndarray) -> None:
    """Parameter elements ``view.index`` are rescaled with ``units`` in ``role``."""
    shape = self.leaf_shapes[view.path]
    leaf_units = np.full(int(np.prod(shape)), UNSCALED, np.int64)
    index = np.broadcast_to(view.index, units.shape).ravel()
    flat_units = np.ravel(units)
    mask = (index >= 0) & (flat_units >= 0)
    index, flat_units = index[mask], flat_units[mask]
    leaf_units[index] = flat_units
    # An element reached with two units (a broadcast bias, a kernel applied twice)
    # is rescaled by both factors at once, so they must be equal: tie them.
    self.union(leaf_units[index], flat_units)
    key = (role, view.path)
    if key in self.leaf_units:
      prev = self.leaf_units[key].ravel()
      both = (prev >= 0) & (leaf_units >= 0)
      self.union(prev[both], leaf_units[both])
      leaf_units = np.where(leaf_units >= 0, leaf_units, prev)
    self.leaf_units[key] = leaf_units.reshape(shape)
    if self.leaf_shifts.setdefault(view.path, view.shift) != view.shift:
      self.taint(view.path, f"used with two offsets ({self.leaf_shifts[view.path]:g} and "
                 f"{view.shift:g})")


RuleFn = Callable[[TraceState, Any, list], list]
_RULES: dict[str, RuleFn] = {}


def register_rule(primitive_name: str, rule: RuleFn | None) -> RuleFn | None:
  """Registers ``rule(state, eqn, in_tags) -> out_tags`` for a primitive.

  ``in_tags`` holds a `Scaled`, a `ParamView`, `ACTIVATION`, a ``np.ndarray``
  (a known constant) or ``None`` per input. Outputs returned as ``None`` from
  inputs that include a `Scaled` or `ACTIVATION` become `ACTIVATION`. Raise `TraceStop` (or return ``None`` tags
  after calling ``tracer.stop``) when the op does not commute with positive
  per-unit scaling of its scaled inputs.

  Args:
    primitive_name: the jaxpr primitive's name, e.g. ``'tanh'``.
    rule: the rule, or ``None`` to remove the primitive's rule.

  Returns:
    The rule registered before, or ``None`` (pass it back to restore it).

  Example:
    >>> import jax, jax.numpy as jnp, enorm_jax
    >>> params = {'a': jnp.ones((3, 4)), 'b': jnp.ones((4, 2))}
    >>> fn = lambda p, x: jnp.square(x @ p['a']) @ p['b']  # square: no rule, stops units
    >>> before = enorm_jax.register_rule('square', lambda state, eqn, tags: [None])
    >>> enorm_jax.explain_graph(fn, params, jnp.ones((1, 3))).graph.num_units
    0
    >>> enorm_jax.register_rule('square', before) is not None
    True
  """
  previous = _RULES.get(primitive_name)
  if rule is None:
    _RULES.pop(primitive_name, None)
  else:
    _RULES[primitive_name] = rule
  return previous


def rule_for(primitive_name: str) -> RuleFn | None:
  """The registered rule of a primitive, or ``None``."""
  return _RULES.get(primitive_name)


def taint_all(tr, tags, what):
  """Stops every scaled input and taints every parameter input; returns ``[None]``."""
  for t in tags:
    if isinstance(t, ParamView):
      tr.taint(t.path, f"{what}")
    if isinstance(t, Scaled):
      tr.stop(t.units, f"{what}")
  return [None]


def rule(*primitive_names: str) -> Callable[[RuleFn], RuleFn]:
  """Decorator form of `register_rule` for one or more primitives."""
  def register(fn: RuleFn) -> RuleFn:
    for name in primitive_names:
      register_rule(name, fn)
    return fn
  return register
