"""From a finished trace to `Group`s: units tied together, their parameter layouts.

`build_graph` turns the `TraceState`'s unit classes and the parameter slices that
produce, consume or carry them into a `RescalingGraph`: a class becomes a group
when nothing stopped it and it has both producers and consumers; classes that
touch the same leaves in the same roles are merged; each leaf's units must form
an axis-aligned layout (`Entry` with an optional reshape ``view``).
"""

from __future__ import annotations

import collections
import itertools

import numpy as np

from enorm_jax.graph import Entry, Group, RescalingGraph
from enorm_jax.tracing._core import UNSCALED, TraceState


def build_graph(tr: TraceState, paths: list[str]) -> tuple[RescalingGraph, list[str]]:
  """The groups of a finished trace, and one reason line per class that is not a group."""
  classes: dict[int, list[int]] = collections.defaultdict(list)
  for u, root in enumerate(tr.roots().tolist()):
    classes[root].append(u)
  # Per class: which (role, path) leaves it touches, in order of first appearance.
  # A unit whose factor is the inverse of its class's (a key projection's, tied to
  # the queries) plays the opposite role: producers are divided, consumers multiplied.
  signature: dict[int, dict[tuple[str, str], None]] = collections.defaultdict(dict)
  leaf_classes: dict[tuple[str, str], np.ndarray] = {}
  table, parity = tr.roots(), tr.parities()
  for (role, path), units in tr.leaf_units.items():
    used = units >= 0
    roots = np.where(used, table[np.maximum(units, 0)], UNSCALED)
    inverse = used & (parity[np.maximum(units, 0)] == 1)
    for key, mask in (((role, path), used & ~inverse), (("inverse_" + role, path), inverse)):
      if mask.any():
        previous = leaf_classes.get(key, np.full(units.shape, UNSCALED, np.int64))
        leaf_classes[key] = np.where(mask, roots, previous)
        for r in np.unique(roots[mask]).tolist():
          signature[r][key] = None
  reasons: dict[str, str] = {}
  valid = {}
  for root, members in classes.items():
    sig = signature.get(root, {})
    roles = {role for role, _ in sig}
    touched = {p for _, p in sig}
    problem = next((tr.stopped[u] for u in members if u in tr.stopped), None)
    if problem is None:
      problem = next((f"{p} is {tr.tainted[p]}" for p in touched if p in tr.tainted), None)
    fields = {_GROUP_FIELD[role] for role in roles}
    if problem is None and None in fields:
      problem = "a carried value (a running mean) would need the inverse factor"
    if problem is None and not {"producers", "consumers"} <= fields:
      problem = "not read by any later parameterized layer" if "producers" in fields \
          else "not produced by a parameterized layer"
    if problem is None and any(
        {_GROUP_FIELD[r] for r, q in sig if q == p} >= {"producers", "consumers"}
        for p in touched):
      problem = "a parameter both produces and consumes the same units (weight sharing)"
    if problem is None:
      valid[root] = tuple(sig)
    else:
      producer = tr.unit_producer[root]
      reasons.setdefault(f"{producer.rsplit('/', 1)[0]} outputs", problem)
  by_signature: dict[tuple, list[int]] = collections.defaultdict(list)
  for root, sig in valid.items():
    by_signature[sig].append(root)
  groups = []
  for sig, roots in by_signature.items():
    group, problem = _make_group(sig, set(roots), leaf_classes)
    anchor = next(p for role, p in sig if role in ("producer", "inverse_consumer"))
    if group is None:
      reasons.setdefault(f"{anchor.rsplit('/', 1)[0]} outputs", problem)
    else:
      first = min(classes[r][0] for r in roots)
      groups.append((first, group))
  groups.sort(key=lambda g: g[0])
  stopped = [f"{k}: {v}" for k, v in reasons.items()]
  return RescalingGraph(tuple(g for _, g in groups)), stopped


# Trace role -> Group field; "inverse_" roles belong to units tied inverse to their class.
_GROUP_FIELD = {"producer": "producers", "consumer": "consumers", "bias": "biases",
                "carried": "carried", "inverse_producer": "consumers",
                "inverse_consumer": "producers", "inverse_bias": "consumer_biases",
                "inverse_carried": None}


def _make_group(sig, roots, leaf_classes):
  """A group of the classes ``roots``: one entry per leaf of ``sig``, every entry
  listing the units in the same order (the first leaf's layouts are tried in turn
  until every other leaf has a layout in that order)."""
  fits = []
  for role, path in sig:
    classes = np.where(np.isin(leaf_classes[(role, path)], list(roots)),
                       leaf_classes[(role, path)], UNSCALED)
    candidates = list(_fit_entries(path, classes, len(roots)))
    if not candidates:
      return None, f"{path}: its units do not form an axis-aligned layout"
    fits.append((role, path, candidates))
  for _, order in fits[0][2]:
    chosen = [next((e for e, seq in candidates if seq == order), None)
              for _, _, candidates in fits]
    if all(e is not None for e in chosen):
      break
  else:
    path = next(p for (_, p, c), e in zip(fits, chosen) if e is None)
    return None, f"{path}: its units are in a different order than the group's"
  entries = collections.defaultdict(list)
  for (role, _, _), entry in zip(fits, chosen):
    entries[_GROUP_FIELD[role]].append(entry)
  anchor = next(p for role, p in sig if role in ("producer", "inverse_consumer"))
  name = f"{anchor.rsplit('/', 1)[0]} outputs"
  return Group(len(order), **{f: tuple(e) for f, e in entries.items()}, name=name), None


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _candidate_views(shape):
  """(view, axes) candidates, from simplest to most general."""
  shape = tuple(shape)
  for a in range(len(shape)):
    yield None, (a,)
  for count in (2, 3):  # several whole axes, e.g. (layer, feature) of stacked layers
    yield from ((None, axes) for axes in itertools.combinations(range(len(shape)), count))
  for a in range(len(shape)):
    for outer in _divisors(shape[a]):
      for inner in _divisors(shape[a] // outer):
        if outer == 1 and inner == 1:
          continue
        mid = shape[a] // (outer * inner)
        yield shape[:a] + (outer, mid, inner) + shape[a + 1:], (a + 1,)
  for a, b in itertools.permutations(range(len(shape)), 2):
    for g in _divisors(shape[b])[1:]:
      view = shape[:b] + (g, shape[b] // g) + shape[b + 1:]
      a_view = a if a < b else a + 1
      yield view, (b, a_view)
  # Units on one axis and the inner part of another, e.g. rotary embeddings' pairs
  # (d, d + head_dim / 2) sharing one unit per (head, d mod head_dim / 2).
  for a, b in itertools.permutations(range(len(shape)), 2):
    for g in _divisors(shape[b])[1:]:
      view = shape[:b] + (g, shape[b] // g) + shape[b + 1:]
      a_view = a if a < b else a + 1
      yield view, tuple(sorted((a_view, b + 1)))


def _fit_entries(path, classes, n):
  """Each `Entry` (with its unit sequence) that reproduces ``classes`` (element ->
  class or -1), simplest first."""
  for view, axes in _candidate_views(classes.shape):
    v = classes if view is None else classes.reshape(view)
    rest = [d for d in range(v.ndim) if d not in axes]
    moved = np.transpose(v, list(axes) + rest).reshape(
        int(np.prod([v.shape[a] for a in axes])), -1)
    if (moved.min(axis=1) != moved.max(axis=1)).any():
      continue
    seq = moved[:, 0]
    inside = np.nonzero(seq >= 0)[0]
    if len(inside) != n or inside[-1] - inside[0] + 1 != n:
      continue
    sequence = seq[inside[0]:inside[-1] + 1].tolist()
    if len(set(sequence)) != n:
      continue
    axis = axes[0] if len(axes) == 1 else axes
    yield Entry(path, axis, view=view, offset=int(inside[0])), sequence
