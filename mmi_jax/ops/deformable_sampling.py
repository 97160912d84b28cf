"""Multi-scale deformable sampling in plain XLA.

The op at the heart of Deformable DETR, of the ViT-Adapter and of MM-Interleaved's
multi-modal feature synchronizer (MMFS). It mirrors `MSDeformAttnFunction` (the CUDA kernel
`ms_deform_attn_forward/backward`) and its PyTorch reference `ms_deform_attn_core_pytorch`:
for every query and head, a weighted sum of bilinear samples taken at `P` points on each of
`L` feature maps ("levels"), with `torch.nn.functional.grid_sample` semantics
(`mode="bilinear"`, `align_corners=False`, `padding_mode="zeros"`).

Design:
  * Levels are vectorized: each level's height, width and start offset into the flattened
    value are small integer arrays, so the traced graph has the same size for 3 levels or 120
    (MMFS over 30 images x 4 scales). Levels are processed in chunks inside a `fori_loop`,
    sized so the gathered samples of one chunk stay within a memory budget; small problems
    run in a single chunk without a loop.
  * Samples are gathered with (batch, head) as gather batching dimensions, which keeps the
    op partitionable over a batch- or head-sharded mesh.
  * Accumulation is in float32 whatever the input dtype; the output has `value.dtype`.
  * A custom VJP recomputes the gathers in the backward pass instead of saving them (the
    saved samples would be `P * 4` times larger than the output), and produces the value
    gradient with one scatter-add per chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Gathered elements (queries x heads x levels x points x 4 corners x head_dim) processed per
# loop step. 2**25 float32 values = 128 MiB if XLA materializes them.
DEFAULT_GATHER_BUDGET = 2**25

# Corner order: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1).
_CORNER_DX = np.array([0, 1, 0, 1], np.int32)
_CORNER_DY = np.array([0, 0, 1, 1], np.int32)

SpatialShapes = tuple[tuple[int, int], ...]


def deformable_sample(
    value: jax.Array,
    spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    gather_budget: int = DEFAULT_GATHER_BUDGET,
) -> jax.Array:
  """Weighted bilinear samples of multi-level feature maps.

  Args:
    value: `[batch, sum_l H_l * W_l, heads, head_dim]`, the levels' maps flattened row-major
      (`y * W_l + x`) and concatenated in the order of `spatial_shapes`.
    spatial_shapes: static `((H_0, W_0), ..., (H_{L-1}, W_{L-1}))`.
    sampling_locations: `[batch, queries, heads, levels, points, 2]`, normalized `(x, y)`:
      `(0, 0)` is the top-left corner of the map and `(1, 1)` the bottom-right corner.
    attention_weights: `[batch, queries, heads, levels, points]`.
    gather_budget: how many gathered elements one loop step may touch (a memory bound; the
      result does not depend on it).

  Returns:
    `[batch, queries, heads * head_dim]` in `value.dtype`, accumulated in float32.
  """
  spatial_shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
  return _deformable_sample(value, spatial_shapes, gather_budget, sampling_locations,
                            attention_weights)


def _check_inputs(value, spatial_shapes, sampling_locations, attention_weights) -> SpatialShapes:
  try:
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  except (TypeError, ValueError) as e:
    raise TypeError("deformable_sample: spatial_shapes must be a static sequence of "
                    f"(height, width) pairs, got {spatial_shapes!r}") from e
  if any(h <= 0 or w <= 0 for h, w in spatial_shapes):
    raise ValueError(f"deformable_sample: spatial_shapes must be positive, got {spatial_shapes}")
  if value.ndim != 4:
    raise ValueError("deformable_sample: value must be [batch, sum(H*W), heads, head_dim], "
                     f"got shape {value.shape}")
  batch, length, heads, _ = value.shape
  expected_length = sum(h * w for h, w in spatial_shapes)
  if length != expected_length:
    raise ValueError(f"deformable_sample: value has {length} positions but spatial_shapes "
                     f"{spatial_shapes} sum to {expected_length}")
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError("deformable_sample: sampling_locations must be "
                     "[batch, queries, heads, levels, points, 2], got shape "
                     f"{sampling_locations.shape}")
  b, _, h, levels, _, _ = sampling_locations.shape
  if (b, h, levels) != (batch, heads, len(spatial_shapes)):
    raise ValueError(
        "deformable_sample: sampling_locations shape "
        f"{sampling_locations.shape} does not match batch={batch}, heads={heads}, "
        f"levels={len(spatial_shapes)} from value {value.shape} and spatial_shapes")
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"deformable_sample: attention_weights shape {attention_weights.shape} "
                     f"must be sampling_locations.shape[:-1] = {sampling_locations.shape[:-1]}")
  return spatial_shapes


def _level_plan(spatial_shapes: SpatialShapes, value_shape, locations_shape,
                gather_budget: int):
  """How levels are processed: levels per loop step, and each level's geometry.

  Returns:
    levels_per_step: the largest divisor of the level count whose gathers fit the budget
      (at least 1).
    geometry: per-level height, width and start offset into the flattened value, each an
      int32 array `[levels]`.
  """
  batch, queries, heads, levels, points, _ = locations_shape
  head_dim = value_shape[-1]
  per_level = max(1, batch * queries * heads * points * 4 * head_dim)
  limit = max(1, gather_budget // per_level)
  levels_per_step = max(d for d in range(1, levels + 1) if levels % d == 0 and d <= limit)
  heights = np.array([h for h, _ in spatial_shapes], np.int32)
  widths = np.array([w for _, w in spatial_shapes], np.int32)
  starts = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
  return levels_per_step, tuple(jnp.asarray(a) for a in (heights, widths, starts))


def _bilinear_corners(locations, heights, widths, starts):
  """Flat indices and bilinear factors of the 4 corners around each sampling location.

  Args:
    locations: `[..., levels, points, 2]` float32 normalized (x, y).
    heights, widths, starts: `[levels]` int32.

  Returns:
    index `[..., levels, points, 4]` int32 (clipped into the level, so always valid),
    weight_x, weight_y `[..., levels, points, 4]` float32 (linear factors per axis),
    inside `[..., levels, points, 4]` bool (the corner lies on the map; zero padding else).
  """
  # grid_sample with align_corners=False: pixel coordinate = location * size - 0.5.
  x = locations[..., 0] * widths[:, None].astype(jnp.float32) - 0.5  # [..., levels, points]
  y = locations[..., 1] * heights[:, None].astype(jnp.float32) - 0.5
  x_floor = jnp.floor(x)
  y_floor = jnp.floor(y)
  frac_x = (x - x_floor)[..., None]
  frac_y = (y - y_floor)[..., None]
  corner_x = x_floor.astype(jnp.int32)[..., None] + _CORNER_DX
  corner_y = y_floor.astype(jnp.int32)[..., None] + _CORNER_DY
  weight_x = jnp.where(_CORNER_DX == 1, frac_x, 1.0 - frac_x)
  weight_y = jnp.where(_CORNER_DY == 1, frac_y, 1.0 - frac_y)
  heights, widths, starts = (a[:, None, None] for a in (heights, widths, starts))
  inside = (corner_x >= 0) & (corner_x < widths) & (corner_y >= 0) & (corner_y < heights)
  index = (starts + jnp.clip(corner_y, 0, heights - 1) * widths
           + jnp.clip(corner_x, 0, widths - 1))
  return index, weight_x, weight_y, inside


def _gather(value, index):
  """value `[B, S, H, D]`, index `[B, Q, H, ...]` -> `[B, Q, H, ..., D]` (batched over B, H)."""
  per_head = jax.vmap(lambda v, i: v[i], in_axes=(1, 1), out_axes=1)  # v [S, D], i [Q, ...]
  return jax.vmap(per_head)(value, index)


def _scatter_add(target, index, updates):
  """Inverse of `_gather`: adds updates `[B, Q, H, ..., D]` into target `[B, S, H, D]`."""
  per_head = jax.vmap(lambda t, i, u: t.at[i].add(u), in_axes=(1, 1, 1), out_axes=1)
  return jax.vmap(per_head)(target, index, updates)


def _forward_chunk(value, heights, widths, starts, locations, weights):
  """Float32 partial output `[B, Q, H, D]` of one chunk of levels."""
  index, weight_x, weight_y, inside = _bilinear_corners(
      locations.astype(jnp.float32), heights, widths, starts)
  corner_weights = jnp.where(inside, weight_x * weight_y, 0.0)
  corner_weights = corner_weights * weights.astype(jnp.float32)[..., None]
  samples = _gather(value, index).astype(jnp.float32)  # [B, Q, H, Lc, P, 4, D]
  return jnp.sum(samples * corner_weights[..., None], axis=(3, 4, 5))


def _for_each_chunk(levels: int, levels_per_step: int, body, init):
  """Runs `body(level_start, carry)` over level chunks: unrolled once, or as a fori_loop."""
  steps = levels // levels_per_step
  if steps == 1:
    return body(0, init)
  return jax.lax.fori_loop(0, steps, lambda i, c: body(i * levels_per_step, c), init)


def _slice_levels(x, start, size, axis):
  if isinstance(start, int) and start == 0 and size == x.shape[axis]:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _deformable_sample(value, spatial_shapes, gather_budget, sampling_locations,
                       attention_weights):
  output, _ = _deformable_sample_fwd(value, spatial_shapes, gather_budget, sampling_locations,
                                     attention_weights)
  return output


def _deformable_sample_fwd(value, spatial_shapes, gather_budget, sampling_locations,
                           attention_weights):
  batch, queries, heads, levels, _, _ = sampling_locations.shape
  head_dim = value.shape[-1]
  chunk, geometry = _level_plan(spatial_shapes, value.shape, sampling_locations.shape,
                                gather_budget)

  def body(level_start, accumulated):
    heights, widths, starts = (_slice_levels(a, level_start, chunk, 0) for a in geometry)
    locations = _slice_levels(sampling_locations, level_start, chunk, 3)
    weights = _slice_levels(attention_weights, level_start, chunk, 3)
    return accumulated + _forward_chunk(value, heights, widths, starts, locations, weights)

  output = _for_each_chunk(levels, chunk,
                           body, jnp.zeros((batch, queries, heads, head_dim), jnp.float32))
  output = output.reshape(batch, queries, heads * head_dim).astype(value.dtype)
  return output, (value, sampling_locations, attention_weights)


def _deformable_sample_bwd(spatial_shapes, gather_budget, residuals, output_grad):
  value, sampling_locations, attention_weights = residuals
  batch, queries, heads, levels, _, _ = sampling_locations.shape
  head_dim = value.shape[-1]
  chunk, geometry = _level_plan(spatial_shapes, value.shape, sampling_locations.shape,
                                gather_budget)
  output_grad = output_grad.reshape(batch, queries, heads, head_dim).astype(jnp.float32)

  def body(level_start, grads):
    value_grad, locations_grad, weights_grad = grads
    heights, widths, starts = (_slice_levels(a, level_start, chunk, 0) for a in geometry)
    locations = _slice_levels(sampling_locations, level_start, chunk, 3).astype(jnp.float32)
    weights = _slice_levels(attention_weights, level_start, chunk, 3).astype(jnp.float32)
    index, weight_x, weight_y, inside = _bilinear_corners(locations, heights, widths, starts)
    samples = _gather(value, index).astype(jnp.float32)  # [B, Q, H, Lc, P, 4, D]
    # <sample of each corner, output gradient>: [B, Q, H, Lc, P, 4].
    corner_dots = jnp.sum(samples * output_grad[:, :, :, None, None, None, :], axis=-1)
    corner_dots = jnp.where(inside, corner_dots, 0.0)
    chunk_weights_grad = jnp.sum(corner_dots * weight_x * weight_y, axis=-1)
    # d(weight_x)/dx is +1 for the right corners and -1 for the left ones; likewise for y.
    sign_x = jnp.where(_CORNER_DX == 1, 1.0, -1.0)
    sign_y = jnp.where(_CORNER_DY == 1, 1.0, -1.0)
    grad_x = jnp.sum(corner_dots * sign_x * weight_y, axis=-1)
    grad_y = jnp.sum(corner_dots * sign_y * weight_x, axis=-1)
    # Pixel coordinate = location * size - 0.5, so d/d(location) carries the map size.
    scale_x = widths.astype(jnp.float32)[:, None]
    scale_y = heights.astype(jnp.float32)[:, None]
    chunk_locations_grad = jnp.stack(
        [grad_x * scale_x * weights, grad_y * scale_y * weights], axis=-1)
    corner_weights = jnp.where(inside, weight_x * weight_y, 0.0) * weights[..., None]
    updates = corner_weights[..., None] * output_grad[:, :, :, None, None, None, :]
    value_grad = _scatter_add(value_grad, index, updates)
    locations_grad = _update_levels(locations_grad, chunk_locations_grad, level_start)
    weights_grad = _update_levels(weights_grad, chunk_weights_grad, level_start)
    return value_grad, locations_grad, weights_grad

  init = (jnp.zeros(value.shape, jnp.float32),
          jnp.zeros(sampling_locations.shape, jnp.float32),
          jnp.zeros(attention_weights.shape, jnp.float32))
  value_grad, locations_grad, weights_grad = _for_each_chunk(levels, chunk, body, init)
  return (value_grad.astype(value.dtype), locations_grad.astype(sampling_locations.dtype),
          weights_grad.astype(attention_weights.dtype))


def _update_levels(full, chunk_values, level_start):
  if isinstance(level_start, int) and level_start == 0 and chunk_values.shape == full.shape:
    return chunk_values
  return jax.lax.dynamic_update_slice_in_dim(full, chunk_values, level_start, axis=3)


_deformable_sample.defvjp(_deformable_sample_fwd, _deformable_sample_bwd)


def minimum_bytes_moved(value_shape, locations_shape, value_itemsize: int,
                        locations_itemsize: int = 4, *, backward: bool = False) -> int:
  """Bytes the op must at least read and write, for reporting achieved bandwidth.

  Forward: read value, locations and weights once, write the output once. Backward: read the
  same inputs and the output gradient, write the three input gradients.
  """
  batch, queries, heads, _, _, _ = locations_shape
  head_dim = value_shape[-1]
  value_bytes = math.prod(value_shape) * value_itemsize
  locations_bytes = math.prod(locations_shape) * locations_itemsize
  weights_bytes = math.prod(locations_shape[:-1]) * locations_itemsize
  output_bytes = batch * queries * heads * head_dim * value_itemsize
  inputs = value_bytes + locations_bytes + weights_bytes
  if backward:
    return 2 * inputs + output_bytes
  return inputs + output_bytes
