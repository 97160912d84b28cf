"""Deformable DETR's multi-scale deformable attention (the ViT-Adapter's injector/extractor).

Mirrors `mm_interleaved/models/encoders/vit_adapter/ops/modules/ms_deform_attn.py::
MSDeformAttn`: per query and head, `num_points` sampling points on each of `num_levels`
feature maps, with offsets and softmax weights (over levels x points) predicted from the
query, and the weighted bilinear samples projected back to the model width.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax import sharding
from mmi_jax.models.linear import Linear
from mmi_jax.ops import deformable_sample
from mmi_jax.ops.deformable_sampling import DEFAULT_GATHER_BUDGET


def direction_grid_init(num_heads: int, num_levels: int, num_points: int):
  """Deformable DETR's offset bias: head h points along angle 2*pi*h/H, point p at p + 1.

  The direction is scaled so its larger coordinate is 1; the result is flattened as
  `[heads, levels, points, 2]`.
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    directions = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    directions = directions / np.abs(directions).max(-1, keepdims=True)
    grid = np.tile(directions[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    assert grid.size == math.prod(shape), (grid.shape, shape)
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MultiScaleDeformableAttention(nn.Module):
  """`MSDeformAttn(d_model, n_levels, n_heads, n_points, ratio)`.

  Attributes:
    embed_dim: query, value-input and output width (`d_model`).
    num_levels, num_heads, num_points: L, H, P.
    value_ratio: the values are projected to `int(embed_dim * value_ratio)` (`ratio`).
    embed_axis: logical axis name of `embed_dim`.
    dtype, param_dtype, precision: as in `Linear`; softmax and sampling run in float32.
    gather_budget: memory bound of the sampling op.
  """

  embed_dim: int
  num_levels: int = 4
  num_heads: int = 8
  num_points: int = 4
  value_ratio: float = 1.0
  embed_axis: str = "embed"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  gather_budget: int = DEFAULT_GATHER_BUDGET

  @nn.compact
  def __call__(self, query: jax.Array, reference_points: jax.Array, values: jax.Array,
               spatial_shapes: Sequence[Sequence[int]],
               padding_mask: jax.Array | None = None) -> jax.Array:
    """Attends from each query to sampled points of the multi-level input.

    Args:
      query: `[B, Lq, embed_dim]`.
      reference_points: `[B or 1, Lq, L or 1, 2]` normalized (x, y) points, or
        `[B or 1, Lq, L or 1, 4]` boxes (cx, cy, w, h) around which points are spread.
      values: `[B, S, embed_dim]`, the L maps flattened row-major and concatenated.
      spatial_shapes: static `((H_0, W_0), ...)` of the L maps.
      padding_mask: optional `[B, S]`, True where the input is padding (its value is zeroed).

    Returns:
      `[B, Lq, embed_dim]`.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    value_dim = int(self.embed_dim * self.value_ratio)
    self._check_inputs(query, reference_points, values, spatial_shapes, padding_mask, value_dim)
    batch, queries, _ = query.shape
    dense = lambda features, axes, **kw: Linear(  # noqa: E731
        features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, **kw)

    value = dense(value_dim, (self.embed_axis, "heads"),
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, name="value_proj")(values)
    if padding_mask is not None:
      value = jnp.where(padding_mask[..., None], jnp.zeros((), value.dtype), value)
    value = value.reshape(batch, values.shape[1], heads, value_dim // heads)
    value = sharding.constrain(value, ("activation_batch", None, "activation_heads", None))

    offsets = dense(heads * levels * points * 2, (self.embed_axis, "heads"),
                    kernel_init=nn.initializers.zeros,
                    bias_init=direction_grid_init(heads, levels, points),
                    name="sampling_offsets")(query)
    offsets = offsets.reshape(batch, queries, heads, levels, points, 2).astype(jnp.float32)
    logits = dense(heads * levels * points, (self.embed_axis, "heads"),
                   kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                   name="attention_weights")(query)
    weights = jax.nn.softmax(logits.astype(jnp.float32).reshape(batch, queries, heads, -1), -1)
    weights = weights.reshape(batch, queries, heads, levels, points)

    reference_points = reference_points.astype(jnp.float32)[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
      # Offsets are in pixels of each level: divide by (W_l, H_l).
      normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)
      locations = reference_points + offsets / normalizer[:, None, :]
    else:
      locations = (reference_points[..., :2]
                   + offsets / points * reference_points[..., 2:] * 0.5)

    sampled = deformable_sample(value, spatial_shapes, locations, weights,
                                gather_budget=self.gather_budget)
    output = dense(self.embed_dim, ("heads", self.embed_axis),
                   kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros, name="output_proj")(sampled)
    return sharding.constrain(output, ("activation_batch", "activation_length",
                                       "activation_embed"))

  def _check_inputs(self, query, reference_points, values, spatial_shapes, padding_mask,
                    value_dim) -> None:
    name = type(self).__name__
    if value_dim % self.num_heads:
      raise ValueError(f"{name}: value width {value_dim} is not divisible by {self.num_heads} "
                       "heads")
    if len(spatial_shapes) != self.num_levels:
      raise ValueError(f"{name}: {len(spatial_shapes)} spatial shapes for num_levels="
                       f"{self.num_levels}")
    if query.ndim != 3 or values.ndim != 3 or values.shape[0] != query.shape[0]:
      raise ValueError(f"{name}: query must be [B, Lq, C] and values [B, S, C], got "
                       f"{query.shape} and {values.shape}")
    expected = sum(h * w for h, w in spatial_shapes)
    if values.shape[1] != expected:
      raise ValueError(f"{name}: values have {values.shape[1]} positions, spatial shapes "
                       f"{spatial_shapes} need {expected}")
    batch, queries, _ = query.shape
    if (reference_points.ndim != 4 or reference_points.shape[0] not in (1, batch)
        or reference_points.shape[1] != queries
        or reference_points.shape[2] not in (1, self.num_levels)
        or reference_points.shape[3] not in (2, 4)):
      raise ValueError(f"{name}: reference_points must be [B or 1, {queries}, "
                       f"{self.num_levels} or 1, 2 or 4], got {reference_points.shape}")
    if padding_mask is not None and padding_mask.shape != values.shape[:2]:
      raise ValueError(f"{name}: padding_mask must be {values.shape[:2]}, got "
                       f"{padding_mask.shape}")
