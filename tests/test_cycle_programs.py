"""What XLA compiles for a cycle: per-unit work stays per unit, and the fast
paths of the unit sums are exact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enorm_jax

balance_jit = jax.jit(enorm_jax.balance, static_argnames=("graph",))


def test_the_division_parts_are_computed_once_per_unit_not_per_weight():
  """The correctly rounded division's parts (a Dekker product and an ulp shift,
  ~40 operations) must not be copied by XLA into the loop over the weights: no
  fused loop of a weight's size computes ``nextafter`` (a bitcast-convert)."""
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      256, (enorm_jax.Entry("a", 1),), (enorm_jax.Entry("b", 0),)),))
  params = {"a": jnp.ones((128, 256)), "b": jnp.ones((256, 64))}
  hlo = jax.jit(lambda p: enorm_jax.balance(p, graph), donate_argnums=0
                ).lower(params).compile().as_text()
  computations = hlo.split("\n\n")
  per_weight = [c for c in computations if re.search(r"-> f32\[(128,256|256,64)\]", c)]
  assert per_weight
  assert not [c.splitlines()[0] for c in per_weight if "bitcast-convert(" in c]


@pytest.mark.parametrize("inner", [(2, 2), (4, 2), (3, 5)])
def test_units_between_small_summed_axes_get_the_exact_first_factor(inner):
  """Units on the (layer, K/V head, dim) axes of a stacked query kernel viewed as
  (layer, input, K/V head, heads per K/V head, half, dim): the first factor of
  each unit is sqrt(R / L) over exactly its elements, computed here by numpy."""
  layers, d_in, kv, dim = 3, 16, 2, 4
  group, half = inner
  view = (layers, d_in, kv, group, half, dim)
  rng = np.random.default_rng(3)
  q = rng.standard_normal((layers, d_in, kv * group, half * dim)).astype(np.float32)
  o = rng.standard_normal((layers, kv, dim, 8)).astype(np.float32)
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      layers * kv * dim, (enorm_jax.Entry("q", (0, 2, 5), view=view),),
      (enorm_jax.Entry("o", (0, 1, 2)),)),))
  _, (scales,) = balance_jit({"q": jnp.asarray(q), "o": jnp.asarray(o)}, graph=graph)
  incoming = (q.reshape(view).astype(np.float64) ** 2).sum(axis=(1, 3, 4))
  outgoing = (o.astype(np.float64) ** 2).sum(axis=3)
  np.testing.assert_allclose(scales, np.sqrt(np.sqrt(outgoing / incoming)).reshape(-1),
                             rtol=1e-6)


def test_several_summed_axes_between_unit_axes_are_not_read_in_one_reduction():
  """A grouped query kernel's unit sums (over the input, the heads per K/V head and
  the rotary halves) read the kernel in one reduction over its input axis alone,
  not in one over all three (slower on XLA:CPU); XLA must not merge them again."""
  layers, d_in, kv, group, half, dim = 4, 128, 2, 2, 2, 16
  view = (layers, d_in, kv, group, half, dim)
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      layers * kv * dim, (enorm_jax.Entry("q", (0, 2, 5), view=view),),
      (enorm_jax.Entry("o", (0, 1, 2)),)),))
  params = {"q": jnp.ones((layers, d_in, kv * group, half * dim)),
            "o": jnp.ones((layers, kv, dim, 8))}
  hlo = jax.jit(lambda p: enorm_jax.balance(p, graph)[0], donate_argnums=0
                ).lower(params).compile().as_text()
  size = layers * d_in * kv * group * half * dim
  sums = re.finditer(r"reduce\((%[\w.]+), [^)]*\), dimensions=\{([0-9,]*)\}, "
                     r"to_apply=(%[\w.]+)", hlo)
  shapes = dict(re.findall(r"(%[\w.]+) = f32\[([0-9,]*)\]", hlo))
  adds = {c.split()[0] for c in hlo.split("\n\n") if re.search(r"= f32\[\] add\(", c)}
  kernel_reads = [dims for operand, dims, region in (m.groups() for m in sums)
                  if region in adds and operand in shapes
                  and np.prod([int(n) for n in shapes[operand].split(",") if n]) == size]
  assert kernel_reads and all("," not in dims for dims in kernel_reads), kernel_reads


def test_adjacent_summed_axes_stay_one_reduction():
  """A conv kernel's units are its outputs: its taps and inputs, adjacent summed
  axes, are summed in one reduction (to one value per output), not in stages."""
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      32, (enorm_jax.Entry("conv", 3),), (enorm_jax.Entry("dense", 0),)),))
  params = {"conv": jnp.ones((3, 3, 16, 32)), "dense": jnp.ones((32, 8))}
  hlo = jax.jit(lambda p: enorm_jax.balance(p, graph)[0], donate_argnums=0
                ).lower(params).compile().as_text()
  shapes = dict(re.findall(r"(%[\w.]+) = f32\[([0-9,]*)\]", hlo))
  sums = re.finditer(r"= f32\[([0-9,]*)\][^=]*reduce\((%[\w.]+), ", hlo)
  outputs = [out for out, operand in (m.groups() for m in sums)
             if shapes.get(operand, "").replace(",", "x") == "3x3x16x32"]
  assert outputs and all(out == "32" for out in outputs), outputs


def test_the_division_parts_are_computed_by_one_program():
  """Both parts of the correctly rounded division come from one fused program:
  exactly one computes ``nextafter`` (a bitcast-convert), not one per part."""
  graph = enorm_jax.RescalingGraph((enorm_jax.Group(
      256, (enorm_jax.Entry("a", 1),), (enorm_jax.Entry("b", 0),)),))
  params = {"a": jnp.ones((128, 256)), "b": jnp.ones((256, 64))}
  hlo = jax.jit(lambda p: enorm_jax.balance(p, graph), donate_argnums=0
                ).lower(params).compile().as_text()
  fused = [c for c in hlo.split("\n\n") if c.startswith("%fused_computation")
           or c.startswith("%") and "fusion" in c.splitlines()[0]]
  assert len([c for c in fused if "bitcast-convert(" in c]) == 1


def _key_value_graph(layers, width, kv, dim):
  """A norm gain's group divides the rows of a key and a value kernel of one
  shape; a rotary-like group (pairs of key dims) and a value group multiply them."""
  view = (layers, width, kv, 2, dim // 2)
  return enorm_jax.RescalingGraph((
      enorm_jax.Group(layers * width, (enorm_jax.Entry("gain", (0, 1)),),
                      (enorm_jax.Entry("k", (0, 1)), enorm_jax.Entry("v", (0, 1)))),
      enorm_jax.Group(layers * kv * dim // 2, (enorm_jax.Entry("q", (0, 2, 4), view=view),),
                      (enorm_jax.Entry("k", (0, 2, 4), view=view),)),
      enorm_jax.Group(layers * kv * dim, (enorm_jax.Entry("v", (0, 2, 3)),),
                      (enorm_jax.Entry("o", (0, 1, 2)),)),
  ))


def test_kernels_of_one_shape_do_not_share_a_broadcast_written_to_memory():
  """The key and the value kernel are divided by the same gain group: their sums
  must each fuse the broadcast of its factors, not read one written to memory
  (a third program of the kernels' size besides their two writes)."""
  layers, width, kv, dim = 4, 128, 2, 32
  graph = _key_value_graph(layers, width, kv, dim)
  rng = np.random.default_rng(0)
  shape = (layers, width, kv, dim)
  params = {"gain": jnp.ones((layers, width)), "q": jnp.asarray(rng.standard_normal(shape)),
            "k": jnp.asarray(rng.standard_normal(shape)),
            "v": jnp.asarray(rng.standard_normal(shape)),
            "o": jnp.asarray(rng.standard_normal((layers, kv, dim, width)))}
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  hlo = jax.jit(lambda p: enorm_jax.balance(p, graph)[0], donate_argnums=0
                ).lower(params).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  kernel_sized = re.findall(r"= f32\[4,128,2,32\]\{[0-9,]*\} fusion\(", entry)
  assert len(kernel_sized) == 3, kernel_sized  # the writes of q, k and v
  balanced, _ = balance_jit(params, graph=graph)
  x = jnp.asarray(rng.standard_normal((5, width)), jnp.float32)
  def value_path(p):  # gain -> value -> ReLU -> output, per layer
    h = x[:, None, :] * p["gain"][None]
    v = jax.nn.relu(jnp.einsum("blw,lwkd->blkd", h, p["v"]))
    return jnp.einsum("blkd,lkdw->blw", v, p["o"])
  np.testing.assert_allclose(value_path(balanced), value_path(params), rtol=2e-4, atol=2e-4)
