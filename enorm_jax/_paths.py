"""'/'-separated string paths into parameter pytrees."""

from __future__ import annotations

from typing import Any

import jax

# Attribute keys that wrap a leaf without naming it (e.g. ``nnx.Variable.value``).
_TRANSPARENT_ATTRS = ("value", "raw_value")


def key_name(key: Any) -> str:
  """The string form of one pytree key."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def key_path_str(key_path: tuple[Any, ...]) -> str:
  """'/'-joined names of a key path, dropping a trailing ``.value`` wrapper."""
  names = [key_name(k) for k in key_path]
  if (names and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
      and names[-1] in _TRANSPARENT_ATTRS):
    names = names[:-1]
  return "/".join(names)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """Maps each leaf's path string to the leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {key_path_str(kp): leaf for kp, leaf in flat}


def flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """``(paths, leaves, treedef)`` of a pytree, paths as in `key_path_str`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [key_path_str(kp) for kp, _ in flat], [leaf for _, leaf in flat], treedef


def map_with_path_str(fn, tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` whose function also gets the leaf's path string."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, *leaves: fn(key_path_str(kp), *leaves), tree, *rest)


def describe_paths(paths, limit: int = 12) -> str:
  paths = sorted(paths)
  shown = ", ".join(repr(p) for p in paths[:limit])
  if len(paths) > limit:
    shown += f", ... ({len(paths) - limit} more)"
  return shown
