"""The convolutional blocks Stable Diffusion's UNet and VAE share, as diffusers builds them.

`ResnetBlock2D`, `Downsample2D` and `Upsample2D` mirror `diffusers.models.resnet`,
`downsampling` and `upsampling` with the settings Stable Diffusion 1.x / 2.x uses (SiLU,
`time_embedding_norm="default"`, no dropout, a 3x3 convolution in the resamplers). Maps are
channels-last `[B, H, W, C]`; param names are diffusers' (`norm1`, `conv1`, `time_emb_proj`,
`conv_shortcut`, `conv`), so a diffusers state dict maps by the `torch_names` rule.

Channels carry the logical axis `embed` (FSDP-sharded); the time embedding's width is `mlp`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax import sharding
from mmi_jax.models.conv import Conv2d
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import GroupNorm

# Logical axes of a convolution kernel's (in, out) channels.
CONV_AXES = (None, "embed")
# Logical axes of a channels-last feature map.
MAP_AXES = ("activation_batch", None, None, "activation_embed")


class ResnetBlock2D(nn.Module):
  """`diffusers.models.resnet.ResnetBlock2D` (SiLU, default time-embedding norm, no dropout).

  `x + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))`, with a 1x1
  `conv_shortcut` on `x` when the width changes, all divided by `output_scale_factor`.

  Attributes:
    in_channels, out_channels: widths (`in_channels` is needed for torch's default init).
    groups: GroupNorm groups of both norms (diffusers' `groups` = `groups_out`).
    epsilon: GroupNorm eps (1e-5 in SD's UNet, 1e-6 in its VAE).
    use_time_embedding: whether the block has `time_emb_proj` (the UNet's do, the VAE's not).
    output_scale_factor: divides the sum (1 in Stable Diffusion).
  """

  in_channels: int
  out_channels: int
  groups: int = 32
  epsilon: float = 1e-6
  use_time_embedding: bool = True
  output_scale_factor: float = 1.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, time_embedding: jax.Array | None = None) -> jax.Array:
    """`x [B, H, W, in_channels]`, `time_embedding [B, T]` -> `[B, H, W, out_channels]`."""
    settings = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = dict(settings, precision=self.precision, kernel_axes=CONV_AXES)
    hidden = GroupNorm(num_groups=self.groups, epsilon=self.epsilon, name="norm1",
                       **settings)(x)
    hidden = Conv2d(self.out_channels, 3, padding=1, in_features=self.in_channels,
                    name="conv1", **conv)(nn.silu(hidden))
    if self.use_time_embedding:
      if time_embedding is None:
        raise ValueError("ResnetBlock2D: this block has time_emb_proj but got no time embedding")
      projected = Linear(self.out_channels, kernel_axes=("mlp", "embed"),
                         precision=self.precision, name="time_emb_proj", **settings)(
                             nn.silu(time_embedding))
      hidden = hidden + projected[:, None, None, :]
    hidden = GroupNorm(num_groups=self.groups, epsilon=self.epsilon, name="norm2",
                       **settings)(hidden)
    hidden = Conv2d(self.out_channels, 3, padding=1, in_features=self.out_channels,
                    name="conv2", **conv)(nn.silu(hidden))
    if self.in_channels != self.out_channels:
      x = Conv2d(self.out_channels, 1, in_features=self.in_channels, name="conv_shortcut",
                 **conv)(x)
    output = (x + hidden) / self.output_scale_factor
    return sharding.constrain(output, MAP_AXES)


class Downsample2D(nn.Module):
  """`diffusers.models.downsampling.Downsample2D` with its convolution (param `conv`).

  A 3x3 convolution with stride 2. `padding=1` pads every side (the UNet); `padding=0`, as
  diffusers does, pads only the bottom and right by one pixel first (the VAE encoder).
  """

  channels: int
  padding: int = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, ceil(H / 2), ceil(W / 2), C]`."""
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv2d(self.channels, 3, stride=2, padding=self.padding, in_features=self.channels,
                  kernel_axes=CONV_AXES, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, name="conv")(x)


class Upsample2D(nn.Module):
  """`diffusers.models.upsampling.Upsample2D`: nearest-neighbour 2x, then a 3x3 convolution.

  `output_size` (diffusers' `upsample_size`) overrides the 2x size, for maps whose size is not
  a multiple of the UNet's total downsampling; nearest then picks `floor(i * in / out)`, as
  torch's `mode="nearest"` does.
  """

  channels: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """`[B, H, W, C]` -> `[B, 2H, 2W, C]` (or `[B, *output_size, C]`)."""
    if output_size is None:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:
      rows = (jnp.arange(output_size[0]) * x.shape[1]) // output_size[0]
      cols = (jnp.arange(output_size[1]) * x.shape[2]) // output_size[1]
      x = x[:, rows][:, :, cols]
    return Conv2d(self.channels, 3, padding=1, in_features=self.channels,
                  kernel_axes=CONV_AXES, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, name="conv")(x)
