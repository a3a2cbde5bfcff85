"""The tracer's built-in rules, one per primitive (tags and rule table: `enorm_jax.tracing._core`).

A rule maps the input tags of one jaxpr equation to its output tags and records
events on the `TraceState`. Ops that commute with a positive per-unit scale pass
`Scaled` tags through; kernels produce and consume units; anything else stops
the units it touches.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from enorm_jax.tracing._core import (ACTIVATION, UNSCALED, ParamView, Scaled, TraceStop,
                                     is_const, max_reads, rule, shape_of,
                                     taint_all)


def _same_transform(fn):
  """Applies a pure index transform (reshape, transpose, ...) to any tag."""
  def rule(tr, eqn, tags):
    t = tags[0]
    if isinstance(t, Scaled):
      return [Scaled(fn(t.units, eqn, fill=UNSCALED))]
    if isinstance(t, ParamView):
      return [dataclasses.replace(t, index=fn(t.index, eqn, fill=-1))]
    return [None]
  return rule


def _reshape(a, eqn, fill):
  if eqn.params.get("dimensions") is not None:
    raise TraceStop("reshape with dimensions")
  return np.reshape(a, eqn.params["new_sizes"])


def _transpose(a, eqn, fill):
  return np.transpose(a, eqn.params["permutation"])


def _broadcast(a, eqn, fill):
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  expanded = np.reshape(a, [a.shape[dims.index(i)] if i in dims else 1 for i in range(len(shape))])
  return np.broadcast_to(expanded, shape)


def _squeeze(a, eqn, fill):
  return np.squeeze(a, axis=tuple(eqn.params["dimensions"]))


def _expand_dims(a, eqn, fill):
  return np.expand_dims(a, tuple(eqn.params["dimensions"]))


def _slice(a, eqn, fill):
  strides = eqn.params["strides"] or (1,) * a.ndim
  return a[tuple(slice(s, e, st) for s, e, st in zip(eqn.params["start_indices"],
                                                     eqn.params["limit_indices"], strides))]


def _rev(a, eqn, fill):
  return np.flip(a, axis=tuple(eqn.params["dimensions"]))


for _name, _fn in (("reshape", _reshape), ("transpose", _transpose),
                   ("broadcast_in_dim", _broadcast), ("squeeze", _squeeze),
                   ("expand_dims", _expand_dims), ("slice", _slice), ("rev", _rev)):
  rule(_name)(_same_transform(_fn))


@rule("dynamic_slice")
def _dynamic_slice(tr, eqn, tags):
  """``x[i]`` at a known position (a loop counter of a ``fori_loop`` over layers)."""
  t, starts = tags[0], tags[1:]
  if not isinstance(t, (Scaled, ParamView)):
    return [None]
  if not all(isinstance(s, np.ndarray) for s in starts):
    raise TraceStop("sliced at a position the tracer cannot follow")
  shape, sizes = shape_of(eqn.invars[0]), eqn.params["slice_sizes"]
  window = tuple(slice(int(np.clip(int(s), 0, n - k)), int(np.clip(int(s), 0, n - k)) + k)
                 for s, n, k in zip(starts, shape, sizes))
  if isinstance(t, Scaled):
    return [Scaled(t.units[window])]
  return [dataclasses.replace(t, index=t.index[window])]


@rule("split")
def _split(tr, eqn, tags):
  """``jnp.split``: consecutive slices along one axis, one output each."""
  t, axis = tags[0], eqn.params["axis"]
  bounds = np.cumsum([0, *eqn.params["sizes"]])

  def parts(a):
    return [np.take(a, np.arange(lo, hi), axis=axis) for lo, hi in zip(bounds[:-1], bounds[1:])]
  if isinstance(t, Scaled):
    return [Scaled(u) for u in parts(t.units)]
  if isinstance(t, ParamView):
    return [dataclasses.replace(t, index=i) for i in parts(t.index)]
  return [None] * len(eqn.outvars)


@rule("convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient",
       "optimization_barrier")
def _identity(tr, eqn, tags):
  if eqn.primitive.name == "convert_element_type" and isinstance(tags[0], Scaled):
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
      raise TraceStop("conversion to a non-float type")
  return list(tags[:len(eqn.outvars)])


@rule("pad")
def _pad(tr, eqn, tags):
  t, value = tags
  if isinstance(t, Scaled) and not is_const(value, lambda v: np.all((v == 0) | np.isinf(v))):
    raise TraceStop("pad with a non-zero value")
  config = eqn.params["padding_config"]
  def fn(a, fill):
    if any(interior for _, _, interior in config):
      out = a
      for axis, (_, _, interior) in enumerate(config):
        if interior:
          idx = np.repeat(np.arange(out.shape[axis]), interior + 1)[:-interior]
          out = np.take(out, idx, axis=axis)
          mask = np.zeros(out.shape[axis], bool)
          mask[::interior + 1] = True
          out = np.where(np.expand_dims(mask, [i for i in range(out.ndim) if i != axis]),
                         out, fill)
      a = out
    lo = [max(lo, 0) for lo, _, _ in config]
    hi = [max(hi, 0) for _, hi, _ in config]
    a = np.pad(a, list(zip(lo, hi)), constant_values=fill)
    crop = tuple(slice(-min(lo_, 0) or None, a.shape[i] + min(hi_, 0) if hi_ < 0 else None)
                 for i, (lo_, hi_, _) in enumerate(config))
    return a[crop]
  if isinstance(t, Scaled):
    return [Scaled(fn(t.units, UNSCALED))]
  if isinstance(t, ParamView):
    return [dataclasses.replace(t, index=fn(t.index, -1))]
  return [None]


def _joined(tr, eqn, tags, combine, what):
  """Tags of a concatenation (``combine`` joins the inputs' unit arrays): scaled
  inputs keep their units, others are unscaled, parameters are tainted."""
  if not any(isinstance(t, (Scaled, ParamView)) for t in tags):
    return [None]
  for t in tags:
    if isinstance(t, ParamView):
      tr.taint(t.path, f"{what} with other values")
  parts = [t.units if isinstance(t, Scaled) else np.full(shape_of(v), UNSCALED, np.int64)
           for t, v in zip(tags, eqn.invars)]
  return [Scaled(combine(parts))]


@rule("concatenate")
def _concatenate(tr, eqn, tags):
  return _joined(tr, eqn, tags, lambda parts: np.concatenate(parts, eqn.params["dimension"]),
                 "concatenated")


@rule("stack")
def _stack(tr, eqn, tags):
  """``jnp.stack``: a concatenation along a new axis."""
  return _joined(tr, eqn, tags, lambda parts: np.stack(parts, eqn.params["axis"]), "stacked")


@rule("complex")
def _complex(tr, eqn, tags):
  """``lax.complex(re, im)``: linear, so its parts must scale alike (complex rotary
  embeddings pair element 2i with 2i + 1 this way)."""
  if any(isinstance(t, ParamView) for t in tags) or not any(
      isinstance(t, Scaled) for t in tags):
    return taint_all(tr, tags, "made complex")
  return _add(tr, eqn, tags)


@rule("real", "imag", "conj")
def _complex_part(tr, eqn, tags):
  t = tags[0]
  if isinstance(t, ParamView):
    return taint_all(tr, tags, eqn.primitive.name)
  return [t if isinstance(t, Scaled) else None]


def _broadcast_to(a, shape):
  return np.broadcast_to(a, shape) if a.shape != tuple(shape) else a


@rule("add", "sub", "add_any")
def _add(tr, eqn, tags):
  out_shape = shape_of(eqn.outvars[0])
  a, b = tags
  if not isinstance(a, Scaled) and not isinstance(b, Scaled):
    shifted = _offset_gain(eqn, a, b, out_shape)
    if shifted is not None:
      return [shifted]
    for t in tags:
      if isinstance(t, ParamView):
        tr.taint(t.path, "added to a value that is not a scaled activation")
    return [None]
  if isinstance(a, Scaled) and isinstance(b, Scaled):  # residual join: tie the units
    ua, ub = _broadcast_to(a.units, out_shape), _broadcast_to(b.units, out_shape)
    both = (ua >= 0) & (ub >= 0)
    tr.union(ua[both], ub[both])
    mixed = (ua >= 0) != (ub >= 0)
    if mixed.any():
      tr.stop(np.where(mixed, np.maximum(ua, ub), UNSCALED), "added to an unscaled value")
    return [Scaled(np.where(both, ua, UNSCALED))]
  scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
  units = _broadcast_to(scaled.units, out_shape)
  if isinstance(other, ParamView):  # a bias (or a running mean for `sub`)
    role = "carried" if eqn.primitive.name == "sub" and scaled is a else "bias"
    if eqn.primitive.name == "sub" and scaled is b:
      tr.taint(other.path, "minus a scaled value")
      tr.stop(units, "subtracted from a parameter")
      return [None]
    index = _broadcast_to(other.index, out_shape)
    if ((index >= 0) & (units < 0)).any():
      tr.taint(other.path, "added to unscaled positions as well")
    if other.shift:
      tr.taint(other.path, "an offset value added as a bias")
      tr.stop(units, "added to an offset parameter")
      return [None]
    tr.record(role, ParamView(other.path, index), units)
    return [Scaled(units)]
  if is_const(other, lambda v: np.all(v == 0)):
    return [Scaled(units)]
  tr.stop(units, "added to a value that does not scale with it")
  return [None]


def _offset_gain(eqn, a, b, out_shape):
  """``scale + c`` or ``scale - c`` with one constant ``c`` (Gemma's ``1 + scale``):
  a view of ``scale`` shifted by ``±c``, or None."""
  view, const = (a, b) if isinstance(a, ParamView) else (b, a)
  if (not isinstance(view, ParamView) or view.shift or not isinstance(const, np.ndarray)
      or const.size == 0 or not np.all(const == const.flat[0])
      or not np.isfinite(const.flat[0]) or (eqn.primitive.name == "sub" and view is b)):
    return None
  shift = float(const.flat[0]) * (-1.0 if eqn.primitive.name == "sub" else 1.0)
  return ParamView(view.path, _broadcast_to(view.index, out_shape), shift)


@rule("mul")
def _mul(tr, eqn, tags):
  out_shape = shape_of(eqn.outvars[0])
  a, b = tags
  if isinstance(a, Scaled) and isinstance(b, Scaled):
    # A gate whose units are all stopped (silu(x @ W_gate): the sigmoid stopped them)
    # is never rescaled: the product is linear in the other branch (SwiGLU, GeGLU).
    if tr.all_stopped(b.units):
      b = ACTIVATION
    elif tr.all_stopped(a.units):
      a = ACTIVATION
    else:
      tr.stop(a.units, "multiplied by another scaled value")
      tr.stop(b.units, "multiplied by another scaled value")
      return [None]
  if not isinstance(a, Scaled) and not isinstance(b, Scaled):
    views = [t for t in tags if isinstance(t, ParamView)]
    index = _broadcast_to(views[0].index, out_shape) if len(views) == 1 else None
    broadcast = index is not None and (
        max_reads(index) > 1 or index.ndim > len(tr.leaf_shapes[views[0].path]))
    if broadcast and any(t is ACTIVATION for t in tags):
      # A per-feature gain broadcast over an activation's positions (a LayerNorm's
      # or RMSNorm's scale), however many positions the example has (one example:
      # a batch axis of 1): each element produces a unit. A gain used once per
      # element at its own rank (a BatchNorm's scale folded into its statistics)
      # stays linear.
      new = _new_units_for_view(tr, views[0].path, index)
      tr.record("producer", dataclasses.replace(views[0], index=index), new)
      return [Scaled(new)]
    if len(views) == 1:  # a parameter times an unscaled factor stays linear in it
      return [dataclasses.replace(views[0], index=_broadcast_to(views[0].index, out_shape))]
    for t in views:
      tr.taint(t.path, "multiplied by another parameter")
    return [None]
  scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
  units = _broadcast_to(scaled.units, out_shape)
  if isinstance(other, ParamView):  # e.g. a BatchNorm scale: consumes, then produces
    index = _broadcast_to(other.index, out_shape)
    tr.record("consumer", dataclasses.replace(other, index=index), units)
    new = _new_units_for_view(tr, other.path, index)
    tr.record("producer", dataclasses.replace(other, index=index), new)
    return [Scaled(new)]
  return [Scaled(units)]


def _new_units_for_view(tr, path, index):
  """Fresh units, one per parameter element used in ``index``."""
  used = np.unique(index[index >= 0])
  fresh = tr.new_units(len(used), path)
  lookup = np.full(int(np.prod(tr.leaf_shapes[path])), UNSCALED, np.int64)
  lookup[used] = fresh
  return np.where(index >= 0, lookup[np.maximum(index, 0)], UNSCALED)


@rule("div")
def _div(tr, eqn, tags):
  a, b = tags
  if isinstance(b, Scaled):
    tr.stop(b.units, "used as a divisor")
    if isinstance(a, Scaled):
      tr.stop(a.units, "divided by a scaled value")
    return [None]
  if isinstance(b, ParamView):
    tr.taint(b.path, "used as a divisor")
  if isinstance(a, Scaled):
    return [Scaled(_broadcast_to(a.units, shape_of(eqn.outvars[0])))]
  if isinstance(a, ParamView):
    return [dataclasses.replace(a, index=_broadcast_to(a.index, shape_of(eqn.outvars[0])))]
  return [None]


@rule("neg", "abs")
def _sign_free(tr, eqn, tags):
  t = tags[0]
  if isinstance(t, ParamView):
    return [t] if eqn.primitive.name == "neg" else taint_all(
        tr, tags, "abs")
  return [t if isinstance(t, Scaled) else None]


@rule("max", "min")
def _max(tr, eqn, tags):
  out_shape = shape_of(eqn.outvars[0])
  a, b = tags
  if isinstance(a, Scaled) and isinstance(b, Scaled):
    ua, ub = _broadcast_to(a.units, out_shape), _broadcast_to(b.units, out_shape)
    both = (ua >= 0) & (ub >= 0)
    tr.union(ua[both], ub[both])
    if ((ua >= 0) != (ub >= 0)).any():
      tr.stop(np.maximum(ua, ub), f"{eqn.primitive.name} with an unscaled value")
    return [Scaled(np.where(both, ua, UNSCALED))]
  if isinstance(a, Scaled) or isinstance(b, Scaled):
    scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
    if is_const(other, lambda v: np.all(v == 0)):  # relu
      return [Scaled(_broadcast_to(scaled.units, out_shape))]
    tr.stop(scaled.units, f"{eqn.primitive.name} with a non-zero threshold")
    return [None]
  return taint_all(tr, tags, eqn.primitive.name)


@rule("ge", "gt", "le", "lt", "eq", "ne")
def _compare(tr, eqn, tags):
  a, b = tags
  if isinstance(a, Scaled) or isinstance(b, Scaled):
    scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
    if isinstance(other, Scaled) or is_const(other, lambda v: np.all(v == 0)):
      if isinstance(other, Scaled):
        tr.union(*[np.broadcast_arrays(scaled.units, other.units)[i] for i in (0, 1)])
      return [None]  # the sign of a scaled value does not change: invariant
    tr.stop(scaled.units, "compared with a non-zero threshold")
    return [None]
  return taint_all(tr, tags, "compared")


@rule("sign")
def _sign(tr, eqn, tags):
  return [None]


@rule("select_n")
def _select(tr, eqn, tags):
  pred, *cases = tags
  out_shape = shape_of(eqn.outvars[0])
  if isinstance(pred, (Scaled, ParamView)):
    raise TraceStop("used as a selector")
  if not any(isinstance(c, Scaled) for c in cases):
    return taint_all(tr, cases, "selected")
  units = [_broadcast_to(c.units, out_shape) if isinstance(c, Scaled) else None for c in cases]
  ref = next(u for u in units if u is not None)
  for c, u in zip(cases, units):
    if u is None:
      if not is_const(c, lambda v: np.all(v == 0)):
        tr.stop(ref, "selected against a value that does not scale with it")
        return [None]
    else:
      tr.union(ref[(ref >= 0) & (u >= 0)], u[(ref >= 0) & (u >= 0)])
  return [Scaled(ref)]


@rule("reduce_sum", "reduce_max", "reduce_min")
def _reduce(tr, eqn, tags):
  t = tags[0]
  axes = tuple(eqn.params["axes"])
  if isinstance(t, ParamView):
    return taint_all(tr, tags, "reduced")
  if not isinstance(t, Scaled):
    return [None]
  lo, hi = t.units.min(axis=axes), t.units.max(axis=axes)
  if (lo != hi).any():
    tr.stop(t.units, f"{eqn.primitive.name} over the unit axis (mixes units)")
    return [None]
  return [Scaled(lo)]


@rule("reduce_window_max", "reduce_window_sum", "reduce_window_min")
def _reduce_window(tr, eqn, tags):
  t = tags[0]
  if isinstance(t, ParamView):
    return taint_all(tr, tags, "pooled")
  if not isinstance(t, Scaled):
    return [None]
  p = eqn.params
  units = t.units
  for axis, (w, s, (lo, hi), bd, wd) in enumerate(zip(
      p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"],
      p["window_dilation"])):
    if (w, s, lo, hi, bd, wd) == (1, 1, 0, 0, 1, 1):
      continue
    first = np.take(units, [0], axis=axis)
    if (units != first).any():  # the window would mix units along this axis
      tr.stop(units, f"{eqn.primitive.name} across units")
      return [None]
    units = np.repeat(first, eqn.outvars[0].aval.shape[axis], axis=axis)
  return [Scaled(units)]
