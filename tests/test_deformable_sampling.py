"""`mmi_jax.ops.deformable_sample` against `torch.nn.functional.grid_sample`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmi_jax.ops import deformable_sample
from mmi_jax.ops.deformable_sampling import minimum_bytes_moved
from torch_references import multi_scale_grid_sample

# Square, wide, tall and 1x1 maps.
SPATIAL_SHAPES = ((6, 7), (3, 5), (4, 2), (1, 1), (2, 2))
BATCH, QUERIES, HEADS, HEAD_DIM, POINTS = 2, 9, 3, 5, 4


def _inputs(seed=0, spatial_shapes=SPATIAL_SHAPES, dtype=np.float32, on_pixel_centres=True):
  """Random inputs whose locations cover the inside, the exact border and the outside.

  With `on_pixel_centres`, some points sit exactly on the centres of corner pixels, where the
  bilinear interpolation has a kink (its derivative in the location is one-sided there, and
  float rounding decides the side); without it those points are moved a third of a pixel
  away, for comparing gradients.
  """
  rng = np.random.default_rng(seed)
  levels = len(spatial_shapes)
  length = sum(h * w for h, w in spatial_shapes)
  value = rng.standard_normal((BATCH, length, HEADS, HEAD_DIM)).astype(dtype)
  locations = rng.uniform(-0.25, 1.25, (BATCH, QUERIES, HEADS, levels, POINTS, 2))
  # Exact borders (0 and 1), the centre of the corner pixels, and points far outside.
  locations[:, 0, :, :, 0] = 0.0
  locations[:, 0, :, :, 1] = 1.0
  locations[:, 1, :, :, 0] = [0.0, 1.0]
  locations[:, 1, :, :, 1] = [-3.0, 0.5]
  locations[:, 2, :, :, 0] = [2.0, 4.0]
  shift = 0.0 if on_pixel_centres else 1 / 3
  for level, (height, width) in enumerate(spatial_shapes):
    locations[:, 2, :, level, 1] = [(0.5 + shift) / width, (0.5 + shift) / height]
    locations[:, 2, :, level, 2] = [1 - (0.5 + shift) / width, 1 - (0.5 + shift) / height]
  locations = locations.astype(np.float32)
  weights = rng.uniform(0.0, 1.0, (BATCH, QUERIES, HEADS, levels, POINTS)).astype(np.float32)
  return value, locations, weights


def _torch_outputs_and_grads(value, locations, weights, output_grad, spatial_shapes):
  tensors = [torch.tensor(np.asarray(a, np.float64), requires_grad=True)
             for a in (value, locations, weights)]
  output = multi_scale_grid_sample(tensors[0], spatial_shapes, tensors[1], tensors[2])
  (output * torch.tensor(np.asarray(output_grad, np.float64))).sum().backward()
  return output.detach().numpy(), [t.grad.numpy() for t in tensors]


def test_forward_matches_grid_sample_inside_border_and_outside():
  value, locations, weights = _inputs()
  expected, _ = _torch_outputs_and_grads(value, locations, weights,
                                         np.zeros((BATCH, QUERIES, HEADS * HEAD_DIM)),
                                         SPATIAL_SHAPES)
  output = jax.jit(deformable_sample, static_argnums=1)(value, SPATIAL_SHAPES, locations,
                                                        weights)
  assert output.shape == (BATCH, QUERIES, HEADS * HEAD_DIM)
  assert output.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(output), expected, rtol=0, atol=1e-5)
  # Points entirely outside every map sample nothing.
  far_outside = locations.copy()
  far_outside[..., 0] = -2.0
  zeros = deformable_sample(value, SPATIAL_SHAPES, far_outside, weights)
  np.testing.assert_array_equal(np.asarray(zeros), 0.0)


@pytest.mark.parametrize("gather_budget", [2**25, 1], ids=["one-chunk", "level-per-step"])
def test_gradients_match_torch_autograd(gather_budget):
  value, locations, weights = _inputs(seed=1, on_pixel_centres=False)
  output_grad = np.random.default_rng(2).standard_normal(
      (BATCH, QUERIES, HEADS * HEAD_DIM)).astype(np.float32)
  _, expected_grads = _torch_outputs_and_grads(value, locations, weights, output_grad,
                                               SPATIAL_SHAPES)

  def loss(value, locations, weights):
    out = deformable_sample(value, SPATIAL_SHAPES, locations, weights,
                            gather_budget=gather_budget)
    return jnp.sum(out * output_grad)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, locations, weights)
  for name, grad, expected in zip(("value", "locations", "weights"), grads, expected_grads):
    error = np.abs(np.asarray(grad, np.float64) - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"d/d{name}: relative error {error}"


def test_chunked_levels_give_the_same_result():
  value, locations, weights = _inputs(seed=3)
  whole = deformable_sample(value, SPATIAL_SHAPES, locations, weights)
  per_level = deformable_sample(value, SPATIAL_SHAPES, locations, weights, gather_budget=1)
  np.testing.assert_allclose(np.asarray(per_level), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
  # 120 levels x 8 points of samples per output: bf16 accumulation would drift far more than
  # one final bf16 rounding.
  spatial_shapes = ((4, 4), (2, 2), (1, 1)) * 40
  rng = np.random.default_rng(4)
  length = sum(h * w for h, w in spatial_shapes)
  value = rng.uniform(0.5, 1.0, (1, length, 2, 8)).astype(np.float32)
  locations = rng.uniform(0, 1, (1, 5, 2, len(spatial_shapes), 8, 2)).astype(np.float32)
  weights = rng.uniform(0, 1, (1, 5, 2, len(spatial_shapes), 8)).astype(np.float32)
  value_bf16 = jnp.asarray(value, jnp.bfloat16)
  output = deformable_sample(value_bf16, spatial_shapes, jnp.asarray(locations, jnp.bfloat16),
                             jnp.asarray(weights, jnp.bfloat16))
  assert output.dtype == jnp.bfloat16
  rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
             for a in (value, locations, weights)]
  expected = multi_scale_grid_sample(torch.tensor(rounded[0]), spatial_shapes,
                                     torch.tensor(rounded[1]), torch.tensor(rounded[2])).numpy()
  relative = np.abs(np.asarray(output, np.float64) - expected) / np.abs(expected)
  assert relative.max() <= 2**-8, relative.max()  # one bf16 rounding of the final sum


def test_graph_size_does_not_grow_with_level_count():
  def hlo_size(levels, grad):
    spatial_shapes = ((8, 8), (4, 4), (2, 2)) * (levels // 3)
    length = sum(h * w for h, w in spatial_shapes)
    args = (jax.ShapeDtypeStruct((1, length, 4, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, 64, 4, levels, 8, 2), jnp.float32),
            jax.ShapeDtypeStruct((1, 64, 4, levels, 8), jnp.float32))
    fn = lambda v, l, w: deformable_sample(v, spatial_shapes, l, w, gather_budget=2**16)  # noqa
    if grad:
      fn = jax.grad(lambda v, l, w, f=fn: f(v, l, w).sum(), argnums=(0, 1, 2))
    return len(jax.jit(fn).lower(*args).as_text().splitlines())

  for grad in (False, True):
    # Past the first level count that needs a loop, the program does not change size.
    assert hlo_size(120, grad) == hlo_size(30, grad), grad


def test_bad_shapes_raise_clear_errors():
  value, locations, weights = _inputs()
  with pytest.raises(ValueError, match="positions but spatial_shapes"):
    deformable_sample(value[:, 1:], SPATIAL_SHAPES, locations, weights)
  with pytest.raises(ValueError, match="levels="):
    # Same total length, one level fewer than the locations have.
    deformable_sample(value, SPATIAL_SHAPES[:-2] + ((1, 5),), locations, weights)
  with pytest.raises(ValueError, match="attention_weights shape"):
    deformable_sample(value, SPATIAL_SHAPES, locations, weights[..., :1])
  with pytest.raises(TypeError, match="static sequence"):
    deformable_sample(value, 3, locations, weights)


def test_minimum_bytes_counts_each_input_and_the_output_once():
  value_shape, locations_shape = (2, 10, 4, 8), (2, 3, 4, 5, 6, 2)
  expected = (2 * 10 * 4 * 8 * 2) + (2 * 3 * 4 * 5 * 6 * 2 * 4) + (2 * 3 * 4 * 5 * 6 * 4) + (
      2 * 3 * 4 * 8 * 2)
  assert minimum_bytes_moved(value_shape, locations_shape, value_itemsize=2) == expected
  output = 2 * 3 * 4 * 8 * 2
  assert minimum_bytes_moved(value_shape, locations_shape, value_itemsize=2, backward=True) == (
      2 * (expected - output) + output)
