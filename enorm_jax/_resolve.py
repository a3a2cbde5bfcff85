"""Graph entries checked against a params tree: shapes, axes and coverage.

`RescalingGraph.resolve` turns each `Group` into a `ResolvedGroup` whose entries
know their parameter's shape (`resolve_entry`), and checks that the units of
every rescaled parameter axis neither overlap nor (unless an entry is
``partial``) leave gaps. This module reads groups and entries by their fields
only; `enorm_jax.graph` imports it, never the reverse.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from enorm_jax import _paths


@dataclasses.dataclass(frozen=True)
class ResolvedEntry:
  """An `Entry` checked against its parameter's shape (internal)."""

  path: str
  shape: tuple[int, ...]
  view: tuple[int, ...]
  axes: tuple[int, ...]
  offset: int
  shift: float = 0.0  # the parameter acts as value + shift

  @property
  def extent(self) -> int:
    """Length of the combined unit axis."""
    return math.prod(self.view[a] for a in self.axes)


@dataclasses.dataclass(frozen=True)
class ResolvedGroup:
  """A `Group` whose entries are checked against the params, by side."""

  size: int
  producers: tuple[ResolvedEntry, ...]
  biases: tuple[ResolvedEntry, ...]
  consumers: tuple[ResolvedEntry, ...]
  carried: tuple[ResolvedEntry, ...]
  consumer_biases: tuple[ResolvedEntry, ...]
  multiplied: tuple[ResolvedEntry, ...]  # producers, biases, carried: times d
  divided: tuple[ResolvedEntry, ...]  # consumers, consumer biases: divided by d


def resolve_entry(entry, shape: Sequence[int]) -> ResolvedEntry:
  """Checks an `Entry` against its parameter's shape and normalizes its axes."""
  shape = tuple(shape)
  view = entry.view if entry.view is not None else shape
  if math.prod(view) != math.prod(shape):
    raise ValueError(
        f"Parameter {entry.path!r} has shape {shape} ({math.prod(shape)} elements) "
        f"but the graph views it as {view} ({math.prod(view)} elements). Fix the "
        "entry's `view` so that it is a reshape of the parameter.")
  axes = []
  for a in entry.axes:
    if not -len(view) <= a < len(view):
      raise ValueError(
          f"Parameter {entry.path!r}: axis {a} is out of range for shape {view}. "
          "Fix the entry's `axis`.")
    axes.append(a % len(view))
  if len(set(axes)) != len(axes):
    raise ValueError(f"Parameter {entry.path!r}: repeated axis in {entry.axis!r}.")
  return ResolvedEntry(entry.path, shape, view, tuple(axes), entry.offset,
                       getattr(entry, "shift", 0.0))


def _gaps(extent, spans):
  """The [start, stop) ranges of ``range(extent)`` that no sorted span covers."""
  gaps, position = [], 0
  for start, stop, _, _ in spans:
    if start > position:
      gaps.append((position, start))
    position = max(position, stop)
  if position < extent:
    gaps.append((position, extent))
  return gaps


def format_ranges(ranges) -> str:
  return ", ".join(f"{a}..{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges)


def _check_leaf(path: str, leaves: Mapping[str, Any], group):
  if path not in leaves:
    close = [p for p in leaves if p.split("/")[-1] == path.split("/")[-1]]
    hint = f" Parameters with the same name: {_paths.describe_paths(close)}." if close else ""
    if path.rsplit("/", 1)[-1] in ("mean", "var"):
      hint += (" It looks like a BatchNorm running statistic: the graph was traced in eval "
               "mode with the batch statistics as leaves. To train only the params (e.g. "
               "nnx.Optimizer(model, tx, wrt=nnx.Param)), trace the model in train mode "
               "with the params alone: units feeding a BatchNorm are then left out and its "
               "scale and bias produce the next units, so no statistic moves.")
    raise ValueError(
        f"Group {group.label}: parameter path {path!r} is not in the params pytree."
        f"{hint} Paths are '/'-joined keys of the tree passed to balance (for Linen, "
        f"variables['params']). Available: {_paths.describe_paths(leaves)}.")
  leaf = leaves[path]
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"Group {group.label}: parameter {path!r} has dtype {dtype}; only floating "
        "point parameters can be rescaled. Remove it from the graph.")
  return tuple(leaf.shape)


def _resolve_in_group(entry, leaves, group) -> ResolvedEntry:
  resolved = resolve_entry(entry, _check_leaf(entry.path, leaves, group))
  if resolved.offset + group.size > resolved.extent:
    raise ValueError(
        f"Group {group.label} has {group.size} units but parameter {entry.path!r} "
        f"(shape {resolved.shape}, view {resolved.view}) has only {resolved.extent} "
        f"positions along axis {entry.axis}" +
        (f" after offset {entry.offset}" if entry.offset else "") +
        f": expected size {entry.offset + group.size}, got {resolved.extent}. "
        "Check the entry's axis, view and offset.")
  return resolved


def resolve_group(group, leaves: Mapping[str, Any]) -> ResolvedGroup:
  """Checks every entry of a `Group` against ``leaves`` (path -> array-like)."""
  def resolve_all(entries):
    return tuple(_resolve_in_group(e, leaves, group) for e in entries)

  for e in group.biases + group.consumer_biases:
    shape = _check_leaf(e.path, leaves, group)
    if len(shape) != 1 and e.view is None and e.axes == (0,):
      raise ValueError(
          f"Group {group.label}: bias {e.path!r} has shape {shape}; a bias read along "
          "axis 0 must be 1-D. Give its entry the axes of the units (e.g. "
          "Entry(path, axis=(0, 1)) for a (heads, head_dim) bias) or a `view`.")
  producers, biases, carried = (resolve_all(group.producers), resolve_all(group.biases),
                                resolve_all(group.carried))
  consumers, consumer_biases = resolve_all(group.consumers), resolve_all(group.consumer_biases)
  return ResolvedGroup(group.size, producers, biases, consumers, carried, consumer_biases,
                       multiplied=producers + biases + carried,
                       divided=consumers + consumer_biases)


def uncovered(groups, resolved):
  """``(path, axes, extent, spans, gaps)`` of every parameter axis side that the
  resolved groups leave partly uncovered; raises where two units overlap."""
  for (path, _, axes, _), (extent, spans) in _spans(groups, resolved).items():
    gaps = _gaps(extent, spans)
    if gaps:
      yield path, axes, extent, spans, gaps


def _spans(groups, resolved):
  """(path, view, axes, side) -> (extent, sorted [(start, stop, group label,
  partial)]), where side is +1 (multiplied: producers, biases, carried) or -1
  (divided: consumers); raises where two units of one side overlap."""
  spans = collections.defaultdict(list)
  for g, rg in zip(groups, resolved):
    sides = ((1, g.multiplied, rg.multiplied), (-1, g.divided, rg.divided))
    for side, entries, resolved_entries in sides:
      for e, r in zip(entries, resolved_entries):
        spans[(r.path, r.view, r.axes, side)].append(
            (r.offset, r.offset + g.size, g.label, e.partial))
  for (path, _, axes, _), items in spans.items():
    items.sort(key=lambda item: item[:2])
    for (a0, b0, l0, _), (a1, b1, l1, _) in zip(items, items[1:]):
      if a1 < b0:
        raise ValueError(
            f"Parameter {path!r}, axis {axes[0] if len(axes) == 1 else axes}: "
            f"positions {a1}..{min(b0, b1) - 1} belong to two units ({l0} and {l1}). "
            "A position can be rescaled by one group only; fix the entries' offsets.")
  return {key: (math.prod(key[1][a] for a in key[2]), items)
          for key, items in spans.items()}
