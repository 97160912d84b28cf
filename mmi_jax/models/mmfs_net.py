"""The UNet's MMFS net: ControlNet-like residuals sampled from the previous image (SPEC 7).

Mirrors `mm_interleaved/models/decoders/sd_mmfs.py` (`MMFSNet`, `MMFSBlock`). One block per
UNet skip connection (`conv_in`'s output and every down resnet / downsampler output: 12 in
SD 2.1) and one on the mid-block output. Each block turns its UNet map into MMFS queries
(LayerNorm + a frozen 2-D sin-cos table, bicubically resized to the map), lets every pixel
sample the multi-scale features of the visible images (LayerNorm'd) around its own centre, and
adds the result through a zero-initialised 1x1 convolution. At initialisation the UNet's output
is therefore unchanged.

Per-block settings follow the original: block `i`'s offsets are scaled by
`offset_scale_sizes / base_spatial_shapes[i]` (64/32/16/8 over 64, 32, 16 or 8 for SD 2.1 at
512 px), the mid block's by the last base shape. Which images are visible (the previous image
of the same document) is the caller's `image_mask`.

Params follow the release (`mmfs_down_blocks_N/{query_norm, feat_norm, pos_embed, mmfs/...,
conv}`, `mmfs_mid_block/...`). The release keeps `pos_embed` and `mmfs/ignore_token` frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax.models.conv import Conv2d
from mmi_jax.models.mmfs import MMFS
from mmi_jax.models.norms import LayerNorm
from mmi_jax.models.remat import remat_layer
from mmi_jax.models.sd_blocks import CONV_AXES
from mmi_jax.models.sincos import sincos_2d
from mmi_jax.ops.resize import resize


@dataclasses.dataclass(frozen=True)
class MMFSNetConfig:
  """The MMFS net's settings (a config's `image_decoder.mmfs` section).

  Attributes:
    feature_dim: width of the image features sampled (the vision encoder's width).
    attention_dim, num_heads, num_points: MMFS's `d_model`, heads and points.
    scale_sizes: side of each feature scale, finest first (64, 32, 16, 8).
    offset_scale_sizes: the scale sizes the original builds its MMFS with (always
      64/32/16/8 in `MMFSNet`); None: `scale_sizes`.
    base_spatial_shapes: one per UNet skip connection; `mid_base_spatial_shape`: the mid
      block's.
    offset_init_magnitude: `sampling_offsets.bias` starts as U(+-magnitude).
    max_images: rows of the relative-image-position table.
    pos_grid_size: side of the frozen sin-cos table (`64 // (512 // image_size)`).
    layer_norm_eps: eps of `query_norm` and `feat_norm`.
    kernel_init_std: init of MMFS's unset kernels; None: PyTorch's Linear default.
  """

  feature_dim: int = 1024
  attention_dim: int = 1024
  num_heads: int = 16
  num_points: int = 8
  scale_sizes: tuple[int, ...] = (64, 32, 16, 8)
  offset_scale_sizes: tuple[int, ...] | None = None
  base_spatial_shapes: tuple[int, ...] = (64,) * 3 + (32,) * 3 + (16,) * 3 + (8,) * 3
  mid_base_spatial_shape: int = 8
  offset_init_magnitude: float = 1.0
  max_images: int = 10
  pos_grid_size: int = 64
  layer_norm_eps: float = 1e-6
  kernel_init_std: float | None = None

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any], **overrides) -> "MMFSNetConfig":
    """From a config section (`model.image_decoder.mmfs`) with this class's field names;
    `overrides` set fields from outside it (`feature_dim`)."""
    names = {field.name for field in dataclasses.fields(cls)}
    values = dict({key: section[key] for key in section.keys()}, **overrides)
    unknown = set(values) - names
    if unknown:
      raise ValueError(f"MMFSNetConfig: unknown keys {sorted(unknown)}")
    values = {key: tuple(value) if isinstance(value, list) else value
              for key, value in values.items()}
    return cls(**values)

  @property
  def feature_positions(self) -> int:
    """Positions per image: `sum_k scale_k ** 2`."""
    return sum(size * size for size in self.scale_sizes)


def pixel_centres(height: int, width: int) -> jax.Array:
  """`[1, H * W, 2]` normalized (x, y) of each pixel's centre, row-major."""
  ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  grid_y, grid_x = jnp.meshgrid(ys, xs, indexing="ij")
  return jnp.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=-1)[None]


class MMFSBlock(nn.Module):
  """One `MMFSBlock`: a residual for a `[B, H, W, C]` UNet map from the images' features.

  Attributes:
    config: the net's settings.
    channels: the UNet map's width (MMFS's query and output width).
    base_spatial_shape: this block's offset base.
  """

  config: MMFSNetConfig
  channels: int
  base_spatial_shape: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    config = self.config
    norm = lambda axis: LayerNorm(epsilon=config.layer_norm_eps, axis_name=axis,  # noqa: E731
                                  dtype=self.dtype, param_dtype=self.param_dtype)
    self.query_norm = norm("embed")
    self.feat_norm = norm("vision_embed")
    table = sincos_2d(self.channels, config.pos_grid_size)
    self.pos_embed = self.param(
        "pos_embed", nn.with_logical_partitioning(
            lambda key, shape, dtype: jnp.asarray(table, dtype), (None, "embed")),
        (config.pos_grid_size ** 2, self.channels), self.param_dtype)
    self.mmfs = MMFS(
        attention_dim=config.attention_dim, output_dim=self.channels,
        scale_sizes=tuple(config.scale_sizes), offset_scale_sizes=config.offset_scale_sizes,
        base_spatial_shape=self.base_spatial_shape, num_heads=config.num_heads,
        num_points=config.num_points, offset_init_magnitude=config.offset_init_magnitude,
        max_images=config.max_images, kernel_init_std=config.kernel_init_std,
        query_axis="embed", value_axis="vision_embed", dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision)
    self.conv = Conv2d(self.channels, 1, in_features=self.channels, kernel_axes=CONV_AXES,
                       kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       precision=self.precision)

  def project_values(self, features: jax.Array) -> jax.Array:
    """`features [B, N, S, feature_dim]` -> MMFS values `[B, N, S, heads, head_dim]`.

    They depend on the images only: a sampler computes them once for all its steps.
    """
    return self.mmfs.project_values(self.feat_norm(features))

  def __call__(self, sample: jax.Array, projected_values: jax.Array,
               image_mask: jax.Array) -> jax.Array:
    """The residual for `sample [B, H, W, C]` (square maps), `[B, H, W, C]`.

    Args:
      sample: the UNet map.
      projected_values: `project_values(features)`, `[B, N, S, heads, head_dim]`.
      image_mask: `[B, N]`, nonzero where the image may be sampled.
    """
    batch, height, width, channels = sample.shape
    if height != width:
      raise ValueError(f"MMFSBlock: the original resizes its position table to square maps "
                       f"only, got a {height}x{width} map")
    query = self.query_norm(sample.reshape(batch, height * width, channels))
    position = self.pos_embed
    if height != self.config.pos_grid_size:
      grid = position.astype(jnp.float32).reshape(self.config.pos_grid_size,
                                                  self.config.pos_grid_size, channels)
      position = resize(grid, (height, width), mode="bicubic").reshape(height * width, channels)
    query = query + position.astype(query.dtype)
    attended = self.mmfs.attend(query, pixel_centres(height, width), projected_values,
                                image_mask)
    return self.conv(attended.reshape(batch, height, width, channels))


class MMFSNet(nn.Module):
  """`MMFSNet`: blocks `mmfs_down_blocks_0..` on the UNet's skips and `mmfs_mid_block`.

  Attributes:
    config: the net's settings.
    block_out_channels, layers_per_block: the UNet's, which fix the skips' widths.
    remat_policy: rematerialise each block (the release checkpoints them).
  """

  config: MMFSNetConfig
  block_out_channels: Sequence[int]
  layers_per_block: int
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    widths = self.skip_channels()
    bases = tuple(self.config.base_spatial_shapes)
    if len(bases) != len(widths):
      raise ValueError(f"MMFSNet: {len(widths)} UNet skip connections but "
                       f"{len(bases)} base_spatial_shapes {bases}")
    block = remat_layer(MMFSBlock, self.remat_policy)
    settings = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.mmfs_down_blocks = [block(self.config, width, base, **settings)
                             for width, base in zip(widths, bases)]
    self.mmfs_mid_block = block(self.config, self.block_out_channels[-1],
                                self.config.mid_base_spatial_shape, **settings)

  def skip_channels(self) -> tuple[int, ...]:
    """The width of each UNet skip connection, in order (`conv_in`, resnets, downsamplers)."""
    widths = [self.block_out_channels[0]]
    for index, width in enumerate(self.block_out_channels):
      widths += [width] * self.layers_per_block
      if index < len(self.block_out_channels) - 1:
        widths.append(width)
    return tuple(widths)

  def project_values(self, features: jax.Array) -> tuple[jax.Array, ...]:
    """Each block's MMFS values of `features [B, N, S, feature_dim]` (down blocks, then mid)."""
    if features.ndim != 4 or features.shape[-2:] != (self.config.feature_positions,
                                                     self.config.feature_dim):
      raise ValueError(f"MMFSNet: features must be [batch, images, "
                       f"{self.config.feature_positions}, {self.config.feature_dim}] (scales "
                       f"{tuple(self.config.scale_sizes)}), got {features.shape}")
    return tuple(block.project_values(features)
                 for block in (*self.mmfs_down_blocks, self.mmfs_mid_block))

  def __call__(self, sample: jax.Array, skips: Sequence[jax.Array], features: jax.Array,
               image_mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`add_residuals` with the values projected from `features [B, N, S, feature_dim]`."""
    return self.add_residuals(sample, skips, self.project_values(features), image_mask)

  def add_residuals(self, sample: jax.Array, skips: Sequence[jax.Array],
                    projected_values: Sequence[jax.Array], image_mask: jax.Array
                    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Adds each block's residual to its skip and the mid block's to `sample`.

    Args:
      sample: the UNet's mid-block output `[B, h, w, C_last]`.
      skips: the UNet's skip connections (`UNet2DConditionModel.down`).
      projected_values: `project_values(features)`.
      image_mask: `[B, N]`.
    Returns:
      `(sample, skips)` with the residuals added.
    """
    if len(skips) != len(self.mmfs_down_blocks):
      raise ValueError(f"MMFSNet: {len(self.mmfs_down_blocks)} blocks but {len(skips)} skips")
    skips = tuple(skip + block(skip, values, image_mask)
                  for skip, block, values in zip(skips, self.mmfs_down_blocks, projected_values))
    sample = sample + self.mmfs_mid_block(sample, projected_values[-1], image_mask)
    return sample, skips
