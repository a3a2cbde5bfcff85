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
  both_sides: dict[tuple, dict[str, np.ndarray]] = {}
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
    if problem is None and sig and tuple(sig) not in both_sides:
      # Leaves read on both sides, less recurrent kernels (which balance handles).
      recurrent = _recurrent_paths(sig, leaf_classes)
      both_sides[tuple(sig)] = {path: pairs for path, pairs in
                                _both_sides(sig, leaf_classes).items() if path not in recurrent}
    if problem is None and any(root in pairs[pairs[:, 0] == pairs[:, 1], 0]
                               for pairs in both_sides[tuple(sig)].values()):
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
  for sig, all_roots in by_signature.items():
    for roots in _independent_sets(all_roots, both_sides[sig]):
      group, problem = _make_group(sig, set(roots), leaf_classes, tr.leaf_shifts)
      anchor = next(p for role, p in sig if role in ("producer", "inverse_consumer"))
      if group is None:
        reasons.setdefault(f"{anchor.rsplit('/', 1)[0]} outputs", problem)
      else:
        groups.append((min(classes[r][0] for r in roots), group))
  groups.sort(key=lambda g: g[0])
  stopped = [f"{k}: {v}" for k, v in reasons.items()]
  return RescalingGraph(tuple(g for _, g in groups)), stopped


def _both_sides(sig, leaf_classes) -> dict[str, np.ndarray]:
  """Per leaf that ``sig`` reads on both sides (one kernel per layer of a loop over
  stacked layers, a recurrent kernel): the (producer class, consumer class) pairs
  of its elements."""
  out = {}
  for path in dict.fromkeys(p for _, p in sig):
    side = _sides(sig, leaf_classes, path)
    if len(side) == 2:
      both = (side["producers"] >= 0) & (side["consumers"] >= 0)
      out[path] = np.unique(np.stack([side["producers"][both], side["consumers"][both]], 1),
                            axis=0)
  return out


def _sides(sig, leaf_classes, path) -> dict[str, np.ndarray]:
  """Leaf ``path``'s producer-side and consumer-side classes (element -> class or -1)."""
  side = {}
  for role, q in sig:
    field = _GROUP_FIELD[role]
    if q == path and field in ("producers", "consumers"):
      side[field] = np.maximum(side.get(field, UNSCALED), leaf_classes[(role, q)])
  return side


def _recurrent_paths(sig, leaf_classes) -> set[str]:
  """Leaves of ``sig`` that are recurrent kernels: square, column ``k`` producing
  unit ``k`` and row ``k`` reading it (``w[i, k]`` times ``d[k] / d[i]``)."""
  out = set()
  for path in dict.fromkeys(p for _, p in sig):
    side = _sides(sig, leaf_classes, path)
    if len(side) < 2 or side["producers"].ndim != 2:
      continue
    prod, cons = side["producers"], side["consumers"]
    if (prod.shape[0] == prod.shape[1] and (prod >= 0).all()
        and (prod == prod[:1]).all() and np.array_equal(prod, cons.T)):
      out.add(path)
  return out


def _independent_sets(roots: list[int], pairs: dict[str, np.ndarray]) -> list[list[int]]:
  """``roots`` split so that no element of a leaf read on both sides is rescaled
  for two classes of one group (those would not be independent coordinates):
  greedy colouring, in order."""
  conflicts = collections.defaultdict(set)
  for p in pairs.values():
    for a, b in p.tolist():
      conflicts[a].add(b)
      conflicts[b].add(a)
  sets: list[list[int]] = []
  for r in roots:
    free = next((s for s in sets if not conflicts[r] & set(s)), None)
    if free is None:
      sets.append([r])
    else:
      free.append(r)
  return sets


# Trace role -> Group field; "inverse_" roles belong to units tied inverse to their class.
_GROUP_FIELD = {"producer": "producers", "consumer": "consumers", "bias": "biases",
                "carried": "carried", "inverse_producer": "consumers",
                "inverse_consumer": "producers", "inverse_bias": "consumer_biases",
                "inverse_carried": None}


def _make_group(sig, roots, leaf_classes, shifts):
  """A group of the classes ``roots``: one entry per leaf of ``sig``, every entry
  listing the units in the same order (the first leaf's layouts are tried in turn
  until every other leaf has a layout in that order)."""
  fits = []
  for role, path in sig:
    classes = np.where(np.isin(leaf_classes[(role, path)], list(roots)),
                       leaf_classes[(role, path)], UNSCALED)
    shift = shifts.get(path, 0.0) if _GROUP_FIELD[role] in ("producers", "consumers") else 0.0
    candidates = list(_fit_entries(path, classes, len(roots), shift))
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


def _prime_factors(n: int) -> list[int]:
  factors, f = [], 2
  while f * f <= n:
    while n % f == 0:
      factors.append(f)
      n //= f
    f += 1
  return factors + ([n] if n > 1 else [])


def _orders(primes: list[int], limit: int = 5040):
  """The distinct orders of a multiset of primes (at most ``limit`` of them)."""
  count = 0

  def walk(rest: collections.Counter, prefix: list[int]):
    nonlocal count
    if not rest:
      count += 1
      yield tuple(prefix)
      return
    for p in sorted(rest, reverse=True):
      if count >= limit:
        return
      rest[p] -= 1
      yield from walk(+rest, prefix + [p])
      rest[p] += 1
  yield from walk(collections.Counter(primes), [])


def _axis_pieces(signature: np.ndarray) -> list[tuple[int, bool]]:
  """The coarsest row-major split of one axis into factors along which the unit
  either changes somewhere (True) or never does (False).

  ``signature[i]`` identifies everything at index ``i`` of the axis, so a factor
  is constant exactly where the signature is. The axis's prime factors are tried
  in every order: the one with the largest constant part wins (a varying factor
  may hide a constant one in another order), then the one with fewest factors.
  """
  best = None
  for order in _orders(_prime_factors(len(signature))):
    pieces: list[list] = []
    for t, prime in enumerate(order):
      view = (int(np.prod(order[:t])), prime, int(np.prod(order[t + 1:])))
      varies = bool((np.diff(signature.reshape(view), axis=1) != 0).any())
      if pieces and pieces[-1][1] == varies:
        pieces[-1][0] *= prime
      else:
        pieces.append([prime, varies])
    key = (-int(np.prod([p for p, varies in pieces if not varies])), len(pieces))
    if best is None or key < best[0]:
      best = key, pieces
  best = best[1] if best else None
  return [tuple(p) for p in best or [[1, False]]]


def _layout(classes: np.ndarray) -> tuple[tuple[int, ...], list[int]]:
  """The coarsest reshape of ``classes`` in which every axis either varies (the
  unit changes along it) or not, and the varying axes.

  Rotary pairs (d, d + half), grouped heads (K/V head, group), stacked layers
  and flattened feature maps (channel, position) all come out of this.
  """
  view, varying = [], []
  for a, size in enumerate(classes.shape):
    rows = np.moveaxis(classes, a, 0).reshape(size, -1)
    signature = np.unique(rows, axis=0, return_inverse=True)[1].ravel()
    for piece, varies in _axis_pieces(signature):
      if varies:
        varying.append(len(view))
      view.append(piece)
  return tuple(view), varying


def _fit_entries(path, classes, n, shift=0.0):
  """Each `Entry` (with its unit sequence) that reproduces ``classes`` (element ->
  class or -1), the plainest first: the varying axes of `_layout` in every order."""
  view, varying = _layout(classes)
  if not varying or len(varying) > 5:
    return
  v = classes.reshape(view)
  rest = [d for d in range(v.ndim) if d not in varying]
  for axes in itertools.permutations(varying):
    moved = np.transpose(v, list(axes) + rest).reshape(
        int(np.prod([v.shape[a] for a in axes])), -1)
    seq = moved[:, 0]
    inside = np.nonzero(seq >= 0)[0]
    if len(inside) != n or inside[-1] - inside[0] + 1 != n:
      continue
    sequence = seq[inside[0]:inside[-1] + 1].tolist()
    if len(set(sequence)) != n:
      continue
    entry_view = None if view == tuple(classes.shape) else view
    axis = axes[0] if len(axes) == 1 else tuple(axes)
    yield Entry(path, axis, view=entry_view, offset=int(inside[0]), shift=shift), sequence
