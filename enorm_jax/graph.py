"""`RescalingGraph`: the static description of a network's rescaling symmetry.

A *group* is a set of ``size`` hidden units (channels). Rescaling unit ``u`` of a
group by ``d > 0`` multiplies the unit's slice of every *producer* (and of the
producer's bias) by ``d`` and divides its slice of every *consumer* by ``d``. For a
ReLU network this leaves the function unchanged.

An `Entry` names a parameter by its '/'-separated path in the params pytree and
says where the units sit in it:

* ``Entry('Dense_0/kernel', axis=1)``: unit ``u`` is ``kernel[:, u]``.
* ``Entry('Dense_3/kernel', axis=1, view=(7 * 7, 64, 10))``: the kernel is read as
  an array of shape ``view`` (a row-major reshape) first. This is how a conv
  channel flattened into a Dense layer is written: channel ``u`` feeds rows
  ``u, u + 64, u + 128, ...`` of the ``(7*7*64, 10)`` kernel.
* ``axis`` may be a tuple of axes whose row-major combination gives the unit
  index (grouped convolutions), and ``offset`` shifts the units along it
  (concatenations): unit ``u`` is index ``offset + u`` of the combined axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enorm_jax import _paths, _resolve


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where a group's units sit in one parameter.

  Attributes:
    path: '/'-separated path of the parameter, e.g. ``'Dense_0/kernel'``.
    axis: the axis (or axes, combined row-major) of the parameter, or of its
      ``view``, that indexes the units. Negative values count from the end.
    view: optional shape the parameter is reshaped to (row-major) before ``axis``
      is applied. ``None`` means the parameter's own shape.
    offset: unit ``u`` is index ``offset + u`` along the (combined) axis.
    bias: for producers and consumers: path of a bias whose entry ``offset + u``
      is rescaled with unit ``u`` (multiplied for a producer, divided for a
      consumer). Bias entries read along axis 0; give them in `Group.biases` or
      `Group.consumer_biases` to use another axis or a view.
    shift: the parameter acts as ``value + shift``: an offset gain, such as
      Gemma's norm ``x * (1 + scale)`` (``shift=1``). Rescaling moves the gain,
      ``value -> (value + shift) * d - shift``; its energy is the gain's; moments
      in an optimizer state move as the gain's (unshifted). Every entry of one
      parameter must have the same shift.
    partial: ``True`` declares that the graph deliberately leaves some positions
      of this axis unrescaled (e.g. half of a concatenation is read by an op
      that stops rescaling). Otherwise the graph's entries on a parameter axis
      must cover every position exactly once, so a graph built for other
      params (a narrower layer) raises instead of balancing a slice.
  """

  path: str
  axis: int | tuple[int, ...]
  view: tuple[int, ...] | None = None
  offset: int = 0
  bias: str | None = None
  partial: bool = False
  shift: float = 0.0

  def __post_init__(self):
    if not isinstance(self.path, str) or not self.path:
      raise TypeError(f"Entry.path must be a non-empty string, got {self.path!r}.")
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    if not axes or not all(isinstance(a, (int, np.integer)) for a in axes):
      raise TypeError(f"Entry {self.path!r}: axis must be an int or a tuple of "
                      f"ints, got {self.axis!r}.")
    if self.view is not None:
      object.__setattr__(self, "view", tuple(int(s) for s in self.view))
    if self.offset < 0:
      raise ValueError(f"Entry {self.path!r}: offset must be >= 0, got {self.offset}.")
    if not (isinstance(self.shift, (int, float, np.integer, np.floating))
            and np.isfinite(self.shift)):
      raise ValueError(f"Entry {self.path!r}: shift must be a finite number, got "
                       f"{self.shift!r}.")
    object.__setattr__(self, "shift", float(self.shift))

  @property
  def axes(self) -> tuple[int, ...]:
    return self.axis if isinstance(self.axis, tuple) else (self.axis,)


@dataclasses.dataclass(frozen=True)
class Group:
  """A set of ``size`` hidden units that are rescaled together.

  Attributes:
    size: number of units (channels).
    producers: entries multiplied by the unit's factor ``d``; their slices (and,
      with ``include_biases``, their biases) make up the incoming norm ``L``.
    consumers: entries divided by ``d``; their slices make up the outgoing norm
      ``R``.
    carried: entries multiplied by ``d`` that never enter the energy, e.g. the
      running mean of an eval-mode BatchNorm that reads the units.
    name: a label used in messages.
    biases: bias entries multiplied by ``d`` that count in ``L`` only with
      ``include_biases``. A producer's ``Entry.bias`` is moved here, so both
      spellings give equal groups.
    consumer_biases: bias entries divided by ``d`` that count in ``R`` only with
      ``include_biases``: consumers that read the unit along their *output* axis,
      like the key projection of a query/key group (scores ``q . k`` keep their
      value when ``q_j`` is multiplied and ``k_j`` divided). A consumer's
      ``Entry.bias`` is moved here.

  One parameter may be both a producer and a consumer of a group only as a
  recurrent kernel: shape ``(size, size)``, ``Entry(path, 1)`` among the
  producers and ``Entry(path, 0)`` among the consumers (``w[i, k]`` moves by
  ``d[k] / d[i]``, its diagonal stays). `balance` then updates the group's units
  one at a time, since they share that kernel.
  """

  size: int
  producers: tuple[Entry, ...]
  consumers: tuple[Entry, ...]
  carried: tuple[Entry, ...] = ()
  name: str = ""
  biases: tuple[Entry, ...] = ()
  consumer_biases: tuple[Entry, ...] = ()

  def __post_init__(self):
    for field in ("producers", "consumers", "carried", "biases", "consumer_biases"):
      value = getattr(self, field)
      if isinstance(value, Entry):
        value = (value,)
      value = tuple(value)
      if not all(isinstance(e, Entry) for e in value):
        raise TypeError(f"Group {self.label}: {field} must be Entry objects.")
      object.__setattr__(self, field, value)
    if not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise ValueError(f"Group {self.label}: size must be a positive int, got {self.size!r}.")
    object.__setattr__(self, "size", int(self.size))
    if not self.producers or not self.consumers:
      raise ValueError(
          f"Group {self.label} needs at least one producer and one consumer; a unit "
          "without both has no finite balancing factor. Drop the group instead.")
    if any(e.bias is not None for e in self.carried + self.biases + self.consumer_biases):
      raise ValueError(f"Group {self.label}: only producers and consumers carry a bias; "
                       "a bias entry cannot have a bias of its own.")
    for kernels, biases in (("producers", "biases"), ("consumers", "consumer_biases")):
      entries = getattr(self, kernels)
      moved = tuple(Entry(e.bias, 0, offset=e.offset, partial=e.partial)
                    for e in entries if e.bias)
      if moved:
        object.__setattr__(self, kernels, tuple(
            dataclasses.replace(e, bias=None) for e in entries))
        object.__setattr__(self, biases, getattr(self, biases) + moved)

  @property
  def label(self) -> str:
    if self.name:
      return repr(self.name)
    producers = getattr(self, "producers", ())
    if producers and isinstance(producers, tuple) and isinstance(producers[0], Entry):
      return f"<outputs of {producers[0].path}>"
    return "<unnamed>"

  @property
  def multiplied(self) -> tuple[Entry, ...]:
    """Entries multiplied by ``d``: producers, their biases and carried values."""
    return self.producers + self.biases + self.carried

  @property
  def divided(self) -> tuple[Entry, ...]:
    """Entries divided by ``d``: consumers and their biases."""
    return self.consumers + self.consumer_biases

  def scaled_paths(self) -> tuple[str, ...]:
    """Every parameter path this group rescales."""
    return tuple(e.path for e in self.multiplied + self.divided)


@dataclasses.dataclass(frozen=True)
class RescalingGraph:
  """An ordered, hashable tuple of `Group`s.

  The graph is static: a jitted function can close over it, and two graphs
  built the same way compare and hash equal, so they share compiled code.
  """

  groups: tuple[Group, ...]

  def __post_init__(self):
    groups = tuple(self.groups)
    if not all(isinstance(g, Group) for g in groups):
      raise TypeError("RescalingGraph.groups must be a sequence of Group objects.")
    object.__setattr__(self, "groups", groups)

  def __len__(self) -> int:
    return len(self.groups)

  def __iter__(self):
    return iter(self.groups)

  @property
  def num_units(self) -> int:
    return sum(g.size for g in self.groups)

  @property
  def paths(self) -> frozenset[str]:
    """Every parameter path the graph rescales."""
    return frozenset(p for g in self.groups for p in g.scaled_paths())

  def subgraph(self, indices: Sequence[int]) -> RescalingGraph:
    """The graph of the groups at ``indices`` (in their order).

    Entries on a parameter that a dropped group also rescales are marked
    ``partial``: the dropped group's positions stay unrescaled on purpose.
    """
    indices = tuple(indices)
    if indices == tuple(range(len(self.groups))):
      return self
    dropped = {p for i, g in enumerate(self.groups) if i not in indices
               for p in g.scaled_paths()}

    def mark(entries):
      return tuple(dataclasses.replace(e, partial=True) if e.path in dropped else e
                   for e in entries)
    return RescalingGraph(tuple(
        dataclasses.replace(g, producers=mark(g.producers), consumers=mark(g.consumers),
                            carried=mark(g.carried), biases=mark(g.biases),
                            consumer_biases=mark(g.consumer_biases))
        for g in (self.groups[i] for i in indices)))

  def validate(self, params: Any) -> None:
    """Raises `ValueError` naming the first entry that does not fit ``params``.

    Only shapes and dtypes are read, so this also works on tracers and on
    `jax.ShapeDtypeStruct` trees.
    """
    self.resolve(_paths.leaves_by_path(params))

  def resolve(self, leaves: Mapping[str, Any]) -> tuple[_resolve.ResolvedGroup, ...]:
    """Resolves every entry against ``leaves`` (path -> array-like).

    Raises `ValueError` if an entry does not fit its parameter, if two entries
    claim the same position of a parameter axis, or if the entries on an axis
    leave positions uncovered and none of them is marked ``partial``.
    """
    resolved = tuple(_resolve.resolve_group(g, leaves) for g in self.groups)
    for path, axes, extent, spans, gaps in _resolve.uncovered(self.groups, resolved):
      if not any(partial for _, _, _, partial in spans):
        covered = ", ".join(f"{a}..{b - 1} ({label})" for a, b, label, _ in spans)
        raise ValueError(
            f"Parameter {path!r}, axis {axes[0] if len(axes) == 1 else axes}: the graph "
            f"covers positions {covered} of {extent}, and leaves {_resolve.format_ranges(gaps)} "
            "uncovered. Every position of a rescaled axis must belong to exactly one "
            "unit. If these params belong to another model (e.g. a wider layer), "
            "rebuild the graph from them; if the slice is deliberate, mark the entry "
            "Entry(..., partial=True).")
    return resolved

  def coverage_gaps(self, leaves: Mapping[str, Any]) -> dict[tuple[str, tuple], list]:
    """``{(path, axes): [(start, stop), ...]}``: positions of each rescaled parameter
    axis that no entry covers (`resolve` raises for them unless an entry is
    ``partial``)."""
    resolved = tuple(_resolve.resolve_group(g, leaves) for g in self.groups)
    return {(path, axes): gaps
            for path, axes, _, _, gaps in _resolve.uncovered(self.groups, resolved)}

  @functools.cached_property
  def phases(self) -> tuple[tuple[int, ...], ...]:
    """Conflict-free phases: groups in one phase share no parameter leaf.

    Updating all groups of a phase at once is still exact block coordinate
    descent. Phases come from a greedy colouring in graph order; a chain needs 2.
    """
    colour_of: list[int] = []
    leaves_of_colour: list[set[str]] = []
    for g in self.groups:
      leaves = set(g.scaled_paths())
      colour = next((k for k, used in enumerate(leaves_of_colour)
                     if not used & leaves), len(leaves_of_colour))
      if colour == len(leaves_of_colour):
        leaves_of_colour.append(set())
      leaves_of_colour[colour] |= leaves
      colour_of.append(colour)
    return tuple(tuple(i for i, c in enumerate(colour_of) if c == k)
                 for k in range(len(leaves_of_colour)))

  @functools.cached_property
  def heights(self) -> Mapping[str, int] | None:
    """Layer heights for the asymmetric energy, or ``None`` if inconsistent.

    Height 0 is the last layer; every group's producers sit one level above its
    consumers. For a chain of q layers, layer k gets height q - k, which turns
    `energy` into the paper's ``sum_k ||c^(q-k) W_k||_p^p``.
    """
    return _heights(self)

  def describe(self) -> str:
    """A human-readable listing of the groups."""
    lines = [f"RescalingGraph: {len(self.groups)} groups, {self.num_units} units"]
    for i, g in enumerate(self.groups):
      def fmt(entries):
        return ", ".join(
            e.path + (f"[axis={e.axis}" + (f", view={e.view}" if e.view else "")
                      + (f", offset={e.offset}" if e.offset else "")
                      + (f", shift={e.shift:g}" if e.shift else "") + "]")
            for e in entries)
      lines.append(f"  [{i}] {g.label} size={g.size}")
      lines.append(f"      producers: {fmt(g.producers)}")
      lines.append(f"      consumers: {fmt(g.consumers)}")
      if g.biases:
        lines.append(f"      biases:    {fmt(g.biases)}")
      if g.consumer_biases:
        lines.append(f"      consumer biases: {fmt(g.consumer_biases)}")
      if g.carried:
        lines.append(f"      carried:   {fmt(g.carried)}")
    return "\n".join(lines)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """The leaves of a pytree by the '/'-joined paths that `Entry` uses.

  Dict keys, attribute names and sequence indices are joined with '/'; an
  ``nnx.Variable``'s trailing ``value`` is dropped.

  Example:
    >>> import jax.numpy as jnp, enorm_jax
    >>> sorted(enorm_jax.leaves_by_path({'Dense_0': {'kernel': jnp.ones((2, 3))}}))
    ['Dense_0/kernel']
  """
  return _paths.leaves_by_path(tree)


def require_graph(graph: Any, argument: str = "graph") -> RescalingGraph:
  """Returns ``graph`` if it is a `RescalingGraph`; raises `TypeError` with the fix."""
  if isinstance(graph, RescalingGraph):
    return graph
  if isinstance(getattr(graph, "graph", None), RescalingGraph):
    raise TypeError(f"{argument} must be a RescalingGraph, got a {type(graph).__name__} "
                    f"(from explain_graph): pass report.graph.")
  hint = ""
  if isinstance(graph, (list, tuple)):
    hint = (" A sequence here is usually the per-group scales: check the argument order "
            "(e.g. rescale(tree, scales, graph)).")
  raise TypeError(f"{argument} must be a RescalingGraph, got {type(graph).__name__}.{hint}")


def _heights(graph: RescalingGraph) -> dict[str, int] | None:
  """Solves h(producer) = h(consumer) + 1 over connected components."""
  edges: dict[str, list[tuple[str, int]]] = {}
  for g in graph.groups:
    prods = [e.path for e in g.producers + g.biases]
    for a in prods:
      for b in (e.path for e in g.consumers):
        edges.setdefault(a, []).append((b, -1))
        edges.setdefault(b, []).append((a, +1))
    for a in prods[1:]:
      edges.setdefault(prods[0], []).append((a, 0))
      edges.setdefault(a, []).append((prods[0], 0))
  height: dict[str, int] = {}
  for start in edges:
    if start in height:
      continue
    component = {start: 0}
    stack = [start]
    while stack:
      a = stack.pop()
      for b, delta in edges[a]:
        if b not in component:
          component[b] = component[a] + delta
          stack.append(b)
        elif component[b] != component[a] + delta:
          return None
    low = min(component.values())
    height.update({k: v - low for k, v in component.items()})
  return height
