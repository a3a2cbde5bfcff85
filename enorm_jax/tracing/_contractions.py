"""The tracer's rules for contractions: ``dot_general`` and ``conv_general_dilated``.

A parameter kernel contracted with activations produces new units along its free
(output) axes and consumes the units on its contracted (input) axes; scaled
values kept on batch or free axes pass their units to the output.
"""

from __future__ import annotations

import numpy as np

from enorm_jax.tracing._core import (ACTIVATION, UNSCALED, ParamView, Scaled, TraceStop,
                                     max_reads, rule, shape_of, taint_all)


@rule("dot_general")
def _dot_general(tr, eqn, tags):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
  shapes = (shape_of(eqn.invars[0]), shape_of(eqn.invars[1]))
  out_shape = shape_of(eqn.outvars[0])
  free = [[d for d in range(len(s)) if d not in c and d not in b]
          for s, c, b in zip(shapes, contract, batch)]
  free_pos = (len(lb), len(lb) + len(free[0]))  # where each side's free dims start
  if all(isinstance(t, Scaled) for t in tags):
    return _bilinear(tr, tags, contract, batch)
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
      if not isinstance(other, ParamView) or not max_reads(other.index) == 1:
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
    if not max_reads(kernel.index) == 1:
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


def _bilinear(tr, tags, contract, batch):
  """Two scaled values contracted together, like attention scores ``q . k``.

  Each output element sums products ``q_j k_j``; it keeps its value if every
  pair multiplied together has inverse factors, so each side's unit at (batch,
  free, contracted) index is tied inverse to the other side's at every free
  index of its own: the key projection's units become the query projection's,
  divided. Free dims along which a side's units are constant (the positions)
  are dropped first; the ones along which they vary (grouped queries' heads)
  are kept, so every query head of a group is tied to its key head.
  """
  reduced = []
  for side, t in enumerate(tags):
    units = t.units
    free = [d for d in range(units.ndim) if d not in batch[side] + contract[side]]
    varying = [d for d in free if _constant_over(units, [d]) is None]
    for d in sorted(set(free) - set(varying), reverse=True):
      units = np.take(units, 0, axis=d)
    kept = sorted(set(range(t.units.ndim)) - (set(free) - set(varying)))
    order = list(batch[side]) + varying + list(contract[side])
    reduced.append((np.transpose(units, [kept.index(d) for d in order]), len(varying)))
  (a, na), (b, nb) = reduced
  nbatch = len(batch[0])
  a = np.expand_dims(a, tuple(range(nbatch + na, nbatch + na + nb)))
  b = np.expand_dims(b, tuple(range(nbatch, nbatch + na)))
  a, b = np.broadcast_arrays(a, b)
  if ((a >= 0) != (b >= 0)).any():
    raise TraceStop("multiplied (dot_general) by a value that is scaled at other positions")
  both = a >= 0
  tr.union(a[both], b[both], inverse=True)
  return [ACTIVATION]


def _constant_over(units, axes):
  """``units`` reduced over ``axes`` if it is constant along them, else None."""
  axes = tuple(axes)
  if not axes:
    return units
  lo, hi = units.min(axis=axes), units.max(axis=axes)
  return lo if (lo == hi).all() else None


@rule("conv_general_dilated")
def _conv(tr, eqn, tags):
  lhs, rhs = tags
  p = eqn.params
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = p["feature_group_count"]
  if p["batch_group_count"] != 1:
    return taint_all(tr, tags, "batch-grouped convolution")
  kshape = shape_of(eqn.invars[1])
  out_shape = shape_of(eqn.outvars[0])
  if isinstance(lhs, Scaled):
    per_channel = _constant_over(lhs.units, [d for d in range(lhs.units.ndim) if d != lspec[1]])
    if per_channel is None:
      tr.stop(lhs.units, "convolved while not constant per channel")
      return [None]
    if not isinstance(rhs, ParamView) or not max_reads(rhs.index) == 1:
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
  if isinstance(rhs, ParamView) and max_reads(rhs.index) == 1:
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
