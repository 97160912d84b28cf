"""MMFS: the multi-image multi-scale feature synchronizer of MM-Interleaved.

Mirrors `mm_interleaved/models/utils/ops/modules/mmfs.py::MMFS` (SPEC section 6). Each query
(an LLM token, or a UNet pixel) samples `num_points` points per head on every scale of every
image it may see, with offsets and weights predicted from the query, and returns the
attention-weighted sum of the bilinear samples.

For query `q` and image `n` (N images, K scales per image, H heads, P points):
  1. `r[n] = (sum_n m + 1 - cumsum_n m) * m` numbers the visible images from the most recent
     (1) backwards; invisible images get 0.
  2. `q'[n] = dynamic_offset_mask(q) + query_relpos[r[n]]`.
  3. offsets `sampling_offsets(q'[n]) -> [H, P, 2]`, shared by the image's K scales and
     multiplied by `scale_k / base_spatial_shape`; location = reference + offset / (W_k, H_k).
  4. logits `attention_weights(q'[n]) -> [H, K, P + 1]`; invisible images get -10000; the last
     ("ignore") slot of every level is then overwritten with -log(N * K); one softmax per
     (query, head) over all N * K * (P + 1) entries.
  5. output = output_proj(sum of weighted samples + sum of ignore weights * ignore_token).

Step 2 is computed without building `q'` (`[B, N, Lq, Dq]`, 30x the query for 30 images):
the projections are linear, so `Linear(a + e) = Linear(a) + e @ kernel`; the query is projected
once and the position table once, and the two are added per (query, image). This is the same
function as the original up to float rounding.

Where the original code and SPEC section 6 differ, this follows the code:
  * `ignore_token` is a parameter the original trains in the LLM (everything under
    `llama_cross_attn` is set trainable; `shapes_13b.json` marks it requires_grad), and
    freezes in the UNet's MMFS net. It is therefore kept and applied, not assumed zero.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax import sharding
from mmi_jax.models.linear import Linear, torch_default_kernel_init
from mmi_jax.ops import deformable_sample
from mmi_jax.ops.deformable_sampling import DEFAULT_GATHER_BUDGET

# Logit added to the attention entries of images a query may not see (as the original).
MASKED_LOGIT = -10000.0


def relative_image_positions(image_mask: jax.Array) -> jax.Array:
  """Numbers visible images from the most recent (1) backwards; invisible images get 0.

  Args:
    image_mask: `[..., N]`, nonzero (or True) where the image is visible.
  Returns:
    int32 `[..., N]`: `(sum_n m + 1 - cumsum_n m) * m`.
  """
  visible = (image_mask != 0).astype(jnp.int32)
  total = jnp.sum(visible, axis=-1, keepdims=True)
  return (total + 1 - jnp.cumsum(visible, axis=-1)) * visible


def uniform_init(magnitude: float):
  """U(-magnitude, magnitude), as `nn.init.uniform_(t, -magnitude, magnitude)`."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -magnitude, magnitude)

  return init


def torch_trunc_normal_init(stddev: float, lower: float = -2.0, upper: float = 2.0):
  """`nn.init.trunc_normal_(t, std=stddev)`: normal, truncated at absolute +-2 (not +-2 std)."""

  def init(key, shape, dtype=jnp.float32):
    unit = jax.random.truncated_normal(key, lower / stddev, upper / stddev, shape, jnp.float32)
    return (unit * stddev).astype(dtype)

  return init


class MMFS(nn.Module):
  """Multi-image multi-scale deformable attention with relative image positions.

  Attributes:
    query_dim: width of the queries (`d_query`); None: `output_dim`, as in the LLM and the UNet.
    attention_dim: width of the projected values (`int(d_model * ratio)` in the original),
      split into `num_heads` heads; also the width of `ignore_token`.
    output_dim: width of the output (`d_out`).
    scale_sizes: side length of each scale's square feature map, e.g. `(32, 16, 8)`; every
      image provides these K maps, flattened and concatenated in this order.
    base_spatial_shape: offsets on scale k are multiplied by `offset_scale_sizes[k] / base`.
    offset_scale_sizes: the `spatial_shapes` the original builds the module with, which set
      those ratios; None: `scale_sizes`. They differ only where the original hard-codes them
      (the UNet's MMFS net always passes 64/32/16/8, whatever the feature maps' sizes).
    num_heads, num_points: H and P.
    offset_init_magnitude: `sampling_offsets.bias` starts as U(+-magnitude).
    max_images: rows of the relative-position table (`max_num_image_per_seq`); calls must
      have fewer image slots than this.
    kernel_init_std: init of the two kernels the original never re-initialises
      (`dynamic_offset_mask`, `attention_weights`): None keeps PyTorch's Linear default (the
      UNet's MMFS net); a number draws N(0, std) (the LLM's, which Hugging Face's Llama
      `_init_weights` initialises with std 0.02 inside `from_pretrained`).
    query_axis, value_axis: logical axis names of the query and value widths.
    dtype: computation dtype (None: follow the inputs); softmax and sampling accumulate in
      float32 regardless.
    param_dtype: storage dtype of the params.
    precision: matmul precision of the projections.
    gather_budget: memory bound of the sampling op (see `deformable_sample`).
  """

  attention_dim: int
  output_dim: int
  scale_sizes: Sequence[int]
  base_spatial_shape: int
  num_heads: int = 16
  num_points: int = 8
  offset_init_magnitude: float = 3.0
  max_images: int = 50
  kernel_init_std: float | None = None
  query_axis: str = "embed"
  value_axis: str = "vision_embed"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  gather_budget: int = DEFAULT_GATHER_BUDGET
  query_dim: int | None = None
  offset_scale_sizes: Sequence[int] | None = None

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any], *, attention_dim: int, output_dim: int,
                   base_spatial_shape: int | None = None, **attributes) -> "MMFS":
    """Builds an MMFS from a config section such as `config.model.llm.mmfs`.

    Args:
      section: fields `num_heads`, `num_points`, `scale_sizes`, `offset_init_magnitude`,
        `max_images` and (unless given here) `base_spatial_shape`.
      attention_dim, output_dim: widths set by the surrounding model.
      base_spatial_shape: overrides the config's (the UNet's blocks each have their own).
      **attributes: other module attributes (dtype, query_axis, name, ...).
    """
    if base_spatial_shape is None:
      base_spatial_shape = section["base_spatial_shape"]
    return cls(attention_dim=attention_dim, output_dim=output_dim,
               scale_sizes=tuple(section["scale_sizes"]),
               base_spatial_shape=base_spatial_shape, num_heads=section["num_heads"],
               num_points=section["num_points"],
               offset_init_magnitude=float(section["offset_init_magnitude"]),
               max_images=section["max_images"],
               kernel_init_std=section.get("kernel_init_std"), **attributes)

  def setup(self):
    query_dim = self.query_dim or self.output_dim
    heads, points, scales = self.num_heads, self.num_points, len(self.scale_sizes)
    default_init = (torch_default_kernel_init if self.kernel_init_std is None else
                    nn.initializers.normal(self.kernel_init_std))
    dense = lambda features, axes, **kw: Linear(  # noqa: E731
        features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, **kw)
    self.value_proj = dense(self.attention_dim, (self.value_axis, "heads"),
                            kernel_init=nn.initializers.xavier_uniform(),
                            bias_init=nn.initializers.zeros)
    self.query_relpos = self.param(
        "query_relpos", nn.with_logical_partitioning(torch_trunc_normal_init(0.02),
                                                     ("image_slots", self.query_axis)),
        (self.max_images, query_dim), self.param_dtype)
    self.dynamic_offset_mask = dense(query_dim, (self.query_axis, "query_proj"),
                                     kernel_init=default_init, bias_init=nn.initializers.zeros)
    self.sampling_offsets = dense(heads * points * 2, (self.query_axis, "heads"),
                                  kernel_init=nn.initializers.zeros,
                                  bias_init=uniform_init(self.offset_init_magnitude))
    self.attention_weights = dense(heads * scales * (points + 1), (self.query_axis, "heads"),
                                   kernel_init=default_init, bias_init=nn.initializers.zeros)
    self.ignore_token = self.param(
        "ignore_token", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
        (self.attention_dim,), self.param_dtype)
    self.output_proj = dense(self.output_dim, ("heads", self.query_axis),
                             kernel_init=nn.initializers.xavier_uniform(),
                             bias_init=nn.initializers.zeros)

  def __call__(self, query: jax.Array, reference_points: jax.Array, values: jax.Array,
               image_mask: jax.Array) -> jax.Array:
    """Samples every visible image's multi-scale features for each query.

    Args:
      query: `[B, Lq, Dq]`.
      reference_points: `[B or 1, Lq, 2]`, normalized (x, y) in [0, 1].
      values: `[B, N, S, Dv]`, each image's K maps flattened (`S = sum_k scale_k ** 2`).
      image_mask: `[B, N]` (all queries alike) or `[B, Lq, N]` (per query); nonzero/True
        where the image is visible.

    Returns:
      `[B, Lq, output_dim]`.
    """
    if values.ndim != 4:
      raise ValueError(f"MMFS: values must be [batch, images, positions, dim], got shape "
                       f"{values.shape}")
    return self.attend(query, reference_points, self.project_values(values), image_mask)

  def project_values(self, values: jax.Array) -> jax.Array:
    """`value_proj` of every image's features, split into heads.

    Depends on the images only, so a decoder computes it once per image and reuses it for
    every new token (see `attend`).

    Args:
      values: `[B, N, S, Dv]`.
    Returns:
      `[B, N, S, H, attention_dim / H]`.
    """
    batch, num_images, positions, _ = values.shape
    value = self.value_proj(values).reshape(batch, num_images, positions, self.num_heads, -1)
    return sharding.constrain(value, ("activation_batch", None, None, "activation_heads", None))

  def attend(self, query: jax.Array, reference_points: jax.Array, projected_values: jax.Array,
             image_mask: jax.Array) -> jax.Array:
    """MMFS on values already passed through `project_values`.

    Args:
      query, reference_points, image_mask: as in `__call__`.
      projected_values: `[B, N, S, H, head_dim]` from `project_values`.
    Returns:
      `[B, Lq, output_dim]`.
    """
    self._check_inputs(query, reference_points, projected_values.shape[:3], image_mask)
    batch, queries, _ = query.shape
    num_images, positions = projected_values.shape[1:3]
    heads, points, scales = self.num_heads, self.num_points, len(self.scale_sizes)
    head_dim = self.attention_dim // heads
    levels = num_images * scales
    value = projected_values.reshape(batch, num_images * positions, heads, head_dim)

    # Per (query, image) projections of q' = dynamic_offset_mask(q) + query_relpos[r].
    image_mask = image_mask if image_mask.ndim == 3 else image_mask[:, None, :]  # [B, 1|Lq, N]
    relative_positions = relative_image_positions(image_mask)
    offset_query = self.dynamic_offset_mask(query)
    offsets = _per_image(self.sampling_offsets(offset_query),
                         self.sampling_offsets(self.query_relpos, add_bias=False),
                         relative_positions)
    logits = _per_image(self.attention_weights(offset_query),
                        self.attention_weights(self.query_relpos, add_bias=False),
                        relative_positions)

    # Sampling locations [B, Lq, H, N * K, P, 2]: one offset per image, scaled per scale.
    sizes = np.asarray(self.scale_sizes, np.float32)
    ratios = np.asarray(self.offset_scale_sizes or self.scale_sizes,
                        np.float32) / self.base_spatial_shape
    # (ratio_k / W_k, ratio_k / H_k) of square maps; arrays of rank <= 5 (rank-7 transposes
    # of this path hit an XLA CPU crash in the sharded gradient, jax 0.10).
    per_scale = jnp.asarray(ratios / sizes)  # [K]
    offsets = offsets.reshape(batch * queries, num_images, heads, points * 2)
    offsets = offsets.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B * Lq, H, N, P * 2]
    offsets = offsets[:, :, :, None, :] * per_scale[:, None]  # [B * Lq, H, N, K, P * 2]
    offsets = offsets.reshape(batch, queries, heads, levels, points, 2)
    locations = reference_points.astype(jnp.float32)[:, :, None, None, None, :] + offsets

    # Attention weights: masked images, ignore slots at -log(N * K), one softmax per head.
    logits = logits.reshape(batch, queries, num_images, heads, scales, points + 1)
    logits = logits.astype(jnp.float32).transpose(0, 1, 3, 2, 4, 5)  # [B, Lq, H, N, K, P+1]
    mask_logits = (1.0 - (image_mask != 0).astype(jnp.float32)) * MASKED_LOGIT  # [B, 1|Lq, N]
    logits = logits + mask_logits[:, :, None, :, None, None]
    # The N * K ignore slots hold exp(-log(N * K)) each, total mass 1 whatever N is: padding
    # image slots (masked) change nothing.
    logits = logits.at[..., points].set(-math.log(levels))
    weights = jax.nn.softmax(logits.reshape(batch, queries, heads, -1), axis=-1)
    weights = weights.reshape(batch, queries, heads, levels, points + 1)

    spatial_shapes = tuple((size, size) for size in self.scale_sizes) * num_images
    sampled = deformable_sample(value, spatial_shapes, locations, weights[..., :points],
                                gather_budget=self.gather_budget)

    # The ignore slots' weights multiply one learned vector per head.
    ignore_weight = jnp.sum(weights[..., points], axis=-1)  # [B, Lq, H]
    ignore_token = self.ignore_token.astype(jnp.float32).reshape(heads, head_dim)
    ignored = ignore_weight[..., None] * ignore_token
    attended = sampled + ignored.reshape(batch, queries, self.attention_dim).astype(sampled.dtype)
    attended = sharding.constrain(attended, ("activation_batch", "activation_length", None))
    output = self.output_proj(attended)
    return sharding.constrain(output, ("activation_batch", "activation_length",
                                       "activation_embed"))

  def _check_inputs(self, query, reference_points, values_shape, image_mask) -> None:
    if self.offset_scale_sizes is not None and (
        len(self.offset_scale_sizes) != len(self.scale_sizes)):
      raise ValueError(f"MMFS: offset_scale_sizes {tuple(self.offset_scale_sizes)} must have "
                       f"one entry per scale of {tuple(self.scale_sizes)}")
    if self.attention_dim % self.num_heads:
      raise ValueError(f"MMFS: attention_dim {self.attention_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    query_dim = self.query_dim or self.output_dim
    if query.ndim != 3 or query.shape[-1] != query_dim:
      raise ValueError(f"MMFS: query must be [batch, queries, {query_dim}], got shape "
                       f"{query.shape}")
    batch, queries, _ = query.shape
    if values_shape[0] != batch:
      raise ValueError(f"MMFS: values have batch {values_shape[0]}, the query {batch}")
    num_images, positions = values_shape[1], values_shape[2]
    expected = sum(s * s for s in self.scale_sizes)
    if positions != expected:
      raise ValueError(f"MMFS: values have {positions} positions per image but scales "
                       f"{tuple(self.scale_sizes)} need {expected}")
    if num_images < 1:
      raise ValueError("MMFS: values need at least one image slot (mask it out if unused)")
    if num_images >= self.max_images:
      raise ValueError(f"MMFS: {num_images} image slots, but the relative-position table has "
                       f"{self.max_images} rows, so at most {self.max_images - 1} images fit")
    if reference_points.ndim != 3 or reference_points.shape[1:] != (queries, 2) or (
        reference_points.shape[0] not in (1, batch)):
      raise ValueError(f"MMFS: reference_points must be [{batch} or 1, {queries}, 2], got "
                       f"shape {reference_points.shape}")
    valid_masks = ((batch, num_images), (batch, queries, num_images))
    if tuple(image_mask.shape) not in valid_masks:
      raise ValueError(f"MMFS: image_mask must be [batch, images] = {valid_masks[0]} or "
                       f"[batch, queries, images] = {valid_masks[1]}, got {image_mask.shape}")


def _per_image(query_part: jax.Array, table_part: jax.Array, positions: jax.Array) -> jax.Array:
  """`Linear(q) + (table @ kernel)[r]` for every (query, image): `[B, Lq, N, features]`.

  Args:
    query_part: `[B, Lq, F]`, the projected queries (with bias).
    table_part: `[max_images, F]`, the projected position table (without bias).
    positions: `[B, 1 or Lq, N]` relative image positions.
  """
  return query_part[:, :, None, :] + jnp.take(table_part, positions, axis=0)
