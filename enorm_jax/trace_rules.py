"""The tracer's built-in rules, one per primitive (see `enorm_jax.trace_core`).

A rule maps the input tags of one jaxpr equation to its output tags and records
events on the `Tracer`. Ops that commute with a positive per-unit scale pass
`Scaled` tags through; kernels produce and consume units; anything else stops
the units it touches.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from enorm_jax.trace_core import UNSCALED, ParamView, Scaled, TraceStop, register_rule, taint_all


def _rule(*names):
  def register(fn):
    for name in names:
      register_rule(name, fn)
    return fn
  return register


def _shape(var) -> tuple[int, ...]:
  return tuple(var.aval.shape)


def _same_transform(fn):
  """Applies a pure index transform (reshape, transpose, ...) to any tag."""
  def rule(tr, eqn, tags):
    t = tags[0]
    if isinstance(t, Scaled):
      return [Scaled(fn(t.units, eqn, fill=UNSCALED))]
    if isinstance(t, ParamView):
      return [ParamView(t.path, fn(t.index, eqn, fill=-1))]
    if isinstance(t, np.ndarray):
      return [None]
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
  register_rule(_name, _same_transform(_fn))


@_rule("convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient",
       "optimization_barrier")
def _identity(tr, eqn, tags):
  if eqn.primitive.name == "convert_element_type" and isinstance(tags[0], Scaled):
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
      raise TraceStop("conversion to a non-float type")
  return list(tags[:len(eqn.outvars)])


@_rule("pad")
def _pad(tr, eqn, tags):
  t, value = tags
  if isinstance(t, Scaled) and not _is_const(value, lambda v: np.all((v == 0) | np.isinf(v))):
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
    return [ParamView(t.path, fn(t.index, -1))]
  return [None]


@_rule("concatenate")
def _concatenate(tr, eqn, tags):
  axis = eqn.params["dimension"]
  if not any(isinstance(t, (Scaled, ParamView)) for t in tags):
    return [None]
  if any(isinstance(t, ParamView) for t in tags):
    for t in tags:
      if isinstance(t, ParamView):
        tr.taint(t.path, "concatenated with other values")
  parts = [t.units if isinstance(t, Scaled) else np.full(_shape(v), UNSCALED, np.int64)
           for t, v in zip(tags, eqn.invars)]
  return [Scaled(np.concatenate(parts, axis=axis))]


def _is_const(tag, pred) -> bool:
  return isinstance(tag, np.ndarray) and bool(pred(tag))


def _broadcast_to(a, shape):
  return np.broadcast_to(a, shape) if a.shape != tuple(shape) else a


@_rule("add", "sub", "add_any")
def _add(tr, eqn, tags):
  out_shape = _shape(eqn.outvars[0])
  a, b = tags
  if not isinstance(a, Scaled) and not isinstance(b, Scaled):
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
    tr.record(role, ParamView(other.path, index), units)
    return [Scaled(units)]
  if _is_const(other, lambda v: np.all(v == 0)):
    return [Scaled(units)]
  tr.stop(units, "added to a value that does not scale with it")
  return [None]


@_rule("mul")
def _mul(tr, eqn, tags):
  out_shape = _shape(eqn.outvars[0])
  a, b = tags
  if isinstance(a, Scaled) and isinstance(b, Scaled):
    tr.stop(a.units, "multiplied by another scaled value")
    tr.stop(b.units, "multiplied by another scaled value")
    return [None]
  if not isinstance(a, Scaled) and not isinstance(b, Scaled):
    views = [t for t in tags if isinstance(t, ParamView)]
    if len(views) == 1:  # a parameter times an unscaled factor stays linear in it
      return [ParamView(views[0].path, _broadcast_to(views[0].index, out_shape))]
    for t in views:
      tr.taint(t.path, "multiplied by another parameter")
    return [None]
  scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
  units = _broadcast_to(scaled.units, out_shape)
  if isinstance(other, ParamView):  # e.g. a BatchNorm scale: consumes, then produces
    index = _broadcast_to(other.index, out_shape)
    tr.record("consumer", ParamView(other.path, index), units)
    new = _new_units_for_view(tr, other.path, index)
    tr.record("producer", ParamView(other.path, index), new)
    return [Scaled(new)]
  return [Scaled(units)]


def _new_units_for_view(tr, path, index):
  """Fresh units, one per parameter element used in ``index``."""
  used = np.unique(index[index >= 0])
  fresh = tr.new_units(len(used), path)
  lookup = np.full(int(np.prod(tr.leaf_shapes[path])), UNSCALED, np.int64)
  lookup[used] = fresh
  return np.where(index >= 0, lookup[np.maximum(index, 0)], UNSCALED)


@_rule("div")
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
    return [Scaled(_broadcast_to(a.units, _shape(eqn.outvars[0])))]
  if isinstance(a, ParamView):
    return [ParamView(a.path, _broadcast_to(a.index, _shape(eqn.outvars[0])))]
  return [None]


@_rule("neg", "abs")
def _sign_free(tr, eqn, tags):
  t = tags[0]
  if isinstance(t, ParamView):
    return [ParamView(t.path, t.index)] if eqn.primitive.name == "neg" else taint_all(
        tr, tags, "abs")
  return [t if isinstance(t, Scaled) else None]


@_rule("max", "min")
def _max(tr, eqn, tags):
  out_shape = _shape(eqn.outvars[0])
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
    if _is_const(other, lambda v: np.all(v == 0)):  # relu
      return [Scaled(_broadcast_to(scaled.units, out_shape))]
    tr.stop(scaled.units, f"{eqn.primitive.name} with a non-zero threshold")
    return [None]
  return taint_all(tr, tags, eqn.primitive.name)


@_rule("ge", "gt", "le", "lt", "eq", "ne")
def _compare(tr, eqn, tags):
  a, b = tags
  if isinstance(a, Scaled) or isinstance(b, Scaled):
    scaled, other = (a, b) if isinstance(a, Scaled) else (b, a)
    if isinstance(other, Scaled) or _is_const(other, lambda v: np.all(v == 0)):
      if isinstance(other, Scaled):
        tr.union(*[np.broadcast_arrays(scaled.units, other.units)[i] for i in (0, 1)])
      return [None]  # the sign of a scaled value does not change: invariant
    tr.stop(scaled.units, "compared with a non-zero threshold")
    return [None]
  return taint_all(tr, tags, "compared")


@_rule("sign")
def _sign(tr, eqn, tags):
  return [None]


@_rule("select_n")
def _select(tr, eqn, tags):
  pred, *cases = tags
  out_shape = _shape(eqn.outvars[0])
  if isinstance(pred, (Scaled, ParamView)):
    raise TraceStop("used as a selector")
  if not any(isinstance(c, Scaled) for c in cases):
    return taint_all(tr, cases, "selected")
  units = [_broadcast_to(c.units, out_shape) if isinstance(c, Scaled) else None for c in cases]
  ref = next(u for u in units if u is not None)
  for c, u in zip(cases, units):
    if u is None:
      if not _is_const(c, lambda v: np.all(v == 0)):
        tr.stop(ref, "selected against a value that does not scale with it")
        return [None]
    else:
      tr.union(ref[(ref >= 0) & (u >= 0)], u[(ref >= 0) & (u >= 0)])
  return [Scaled(ref)]


@_rule("reduce_sum", "reduce_max", "reduce_min")
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


@_rule("reduce_window_max", "reduce_window_sum", "reduce_window_min")
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


@_rule("dot_general")
def _dot_general(tr, eqn, tags):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
  shapes = (_shape(eqn.invars[0]), _shape(eqn.invars[1]))
  out_shape = _shape(eqn.outvars[0])
  free = [[d for d in range(len(s)) if d not in c and d not in b]
          for s, c, b in zip(shapes, contract, batch)]
  free_pos = (len(lb), len(lb) + len(free[0]))  # where each side's free dims start
  if all(isinstance(t, Scaled) for t in tags):
    return taint_all(tr, tags, "multiplied (dot_general) by another scaled value")
  if all(isinstance(t, ParamView) for t in tags):
    return taint_all(tr, tags, "multiplied by another parameter")
  out_units = np.full(out_shape, UNSCALED, np.int64)
  for side in (0, 1):
    t, other = tags[side], tags[1 - side]
    if not isinstance(t, Scaled):
      continue
    dims = range(t.units.ndim)
    per_contract = _constant_over(t.units, [d for d in dims if d not in contract[side]])
    per_free = _constant_over(t.units, contract[side] + batch[side])
    on_contract = per_contract is not None and (per_contract >= 0).any()
    on_free = per_free is not None and (per_free >= 0).any()
    per_kept = _constant_over(t.units, contract[side])
    if per_contract is None and per_free is None and per_kept is not None:
      # Units on batch (and free) dims, constant over the contraction: each output
      # element is a sum over one unit's values, e.g. attention weights times the
      # values, per head. Valid against an unscaled, non-parameter operand.
      if isinstance(other, (Scaled, ParamView)):
        raise TraceStop("scaled along a batch dimension of a product with a parameter")
      kept = [d for d in dims if d not in contract[side]]
      order = list(batch[side]) + free[side]
      positions = list(range(len(batch[side]))) + list(
          range(free_pos[side], free_pos[side] + len(free[side])))
      out_units = _place(np.transpose(per_kept, [kept.index(d) for d in order]), positions,
                         out_shape).copy()
      continue
    if (per_contract is None and per_free is None) or (on_contract and on_free):
      raise TraceStop("contracted in a way that mixes units")
    if on_contract:
      if not isinstance(other, ParamView) or not _is_full_view(tr, other):
        raise TraceStop("contracted with something other than a parameter kernel")
      act, ker = list(contract[side]), list(contract[1 - side])
      perm = [sorted(act).index(act[ker.index(k)]) for k in sorted(ker)]
      tr.record("consumer", other, _place(np.transpose(per_contract, perm), sorted(ker),
                                          shapes[1 - side]))
    elif on_free:  # scaled along free dims: the output keeps those units
      out_units = _place(per_free, range(free_pos[side], free_pos[side] + len(free[side])),
                         out_shape).copy()
  for side in (0, 1):
    kernel = tags[side]
    if not isinstance(kernel, ParamView) or not free[side]:
      continue
    if not _is_full_view(tr, kernel):
      tr.taint(kernel.path, "used as a transformed kernel")
      continue
    kshape = shapes[side]
    new = tr.new_units(int(np.prod([kshape[d] for d in free[side]])), kernel.path)
    new = new.reshape([kshape[d] for d in free[side]])
    tr.record("producer", kernel, _place(new, free[side], kshape))
    if (out_units >= 0).any():
      raise TraceStop("mixed with new units in a product")
    out_units = _place(new, range(free_pos[side], free_pos[side] + len(free[side])),
                       out_shape).copy()
  return [Scaled(out_units) if (out_units >= 0).any() else None]


def _place(values, dims, shape):
  """Broadcasts ``values`` (indexed by ascending ``dims`` of ``shape``) to ``shape``."""
  dims = list(dims)
  expanded = values.reshape([shape[d] if d in dims else 1 for d in range(len(shape))])
  return np.broadcast_to(expanded, shape)


def _constant_over(units, axes):
  """``units`` reduced over ``axes`` if it is constant along them, else None."""
  axes = tuple(axes)
  if not axes:
    return units
  lo, hi = units.min(axis=axes), units.max(axis=axes)
  return lo if (lo == hi).all() else None


def _is_full_view(tr, view: ParamView) -> bool:
  """Whether ``view`` reads each leaf element at most once (a reshaped, transposed,
  sliced or padded kernel, but not a broadcast or a repeated one)."""
  index = np.asarray(view.index)
  used = index[index >= 0]
  return used.size > 0 and int(np.bincount(used).max()) <= 1


@_rule("conv_general_dilated")
def _conv(tr, eqn, tags):
  lhs, rhs = tags
  p = eqn.params
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = p["feature_group_count"]
  if p["batch_group_count"] != 1:
    return taint_all(tr, tags, "batch-grouped convolution")
  kshape = _shape(eqn.invars[1])
  out_shape = _shape(eqn.outvars[0])
  if isinstance(lhs, Scaled):
    per_channel = _constant_over(lhs.units, [d for d in range(lhs.units.ndim) if d != lspec[1]])
    if per_channel is None:
      tr.stop(lhs.units, "convolved while not constant per channel")
      return [None]
    if not isinstance(rhs, ParamView) or not _is_full_view(tr, rhs):
      tr.stop(lhs.units, "convolved with something other than a parameter kernel")
      return [None]
    c_in = kshape[rspec[1]]
    c_out = kshape[rspec[0]]
    o = np.arange(c_out) // (c_out // groups)
    i = np.arange(c_in)
    channel = o[None, :] * c_in + i[:, None]  # [in, out] -> input channel read
    consumed = per_channel[channel]
    kunits = _place_2d(consumed, rspec[1], rspec[0], kshape)
    tr.record("consumer", rhs, kunits)
  elif isinstance(rhs, Scaled):
    return taint_all(tr, tags, "convolution with a scaled kernel")
  if isinstance(rhs, ParamView) and _is_full_view(tr, rhs):
    new = tr.new_units(kshape[rspec[0]], rhs.path)
    tr.record("producer", rhs, _place(new, [rspec[0]], kshape))
    return [Scaled(_place(new, [ospec[1]], out_shape).copy())]
  if isinstance(rhs, ParamView):
    tr.taint(rhs.path, "used as a transformed kernel")
  if isinstance(lhs, ParamView):
    tr.taint(lhs.path, "convolved as an input")
  return [None]


def _place_2d(values, dim_a, dim_b, shape):
  """Broadcasts ``values[a, b]`` over dims (dim_a, dim_b) of ``shape``."""
  if dim_a > dim_b:
    values, dim_a, dim_b = values.T, dim_b, dim_a
  expanded = values.reshape([shape[d] if d in (dim_a, dim_b) else 1 for d in range(len(shape))])
  return np.broadcast_to(expanded, shape)
