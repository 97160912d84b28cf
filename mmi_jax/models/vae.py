"""Stable Diffusion's image autoencoder (diffusers' `AutoencoderKL`).

Mirrors `diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL` with its `Encoder` and
`Decoder` (`autoencoders/vae.py`) as Stable Diffusion configures them: `DownEncoderBlock2D`s
(resnets without time embedding, a bottom/right-padded stride-2 convolution), a mid block of
resnet / single-head self-attention / resnet, `UpDecoderBlock2D`s, GroupNorms with eps 1e-6.
`encode` gives the latent Gaussian's mean (and `encode_distribution` its log-variance, clipped
to [-30, 20] as diffusers' `DiagonalGaussianDistribution`); `decode` maps latents back to
images. Latents here are unscaled: multiply by `scaling_factor` (0.18215 for SD) before the
UNet, as diffusers pipelines do.

Maps are channels-last `[B, H, W, C]`; images are in [-1, 1]. Param names are diffusers'
(`encoder/down_blocks_0/resnets_1/conv2`, `encoder/mid_block/attentions_0/to_q`,
`quant_conv`, `post_quant_conv`, `decoder/up_blocks_3/upsamplers_0/conv`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax.models.conv import Conv2d
from mmi_jax.models.diffusers_config import config_from_mapping
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import GroupNorm
from mmi_jax.models.remat import remat_layer
from mmi_jax.models.sd_blocks import CONV_AXES, Downsample2D, ResnetBlock2D, Upsample2D

VAE_EPSILON = 1e-6  # every GroupNorm of diffusers' Encoder/Decoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The autoencoder's hyper-parameters, named as in a diffusers `vae/config.json`."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  sample_size: int = 512
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  # diffusers config keys that must keep these values (anything else is another model).
  REQUIRED_DEFAULTS = {
      "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
      "shift_factor": None, "latents_mean": None, "latents_std": None,
  }
  IGNORED = ("force_upcast",)  # a half-precision hint for diffusers pipelines

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any]) -> "VAEConfig":
    """From a config section (`config.model.image_decoder.vae`) or a diffusers config dict."""
    config = config_from_mapping(cls, section, fixed=cls.REQUIRED_DEFAULTS,
                                 ignored=cls.IGNORED,
                                 family="Stable Diffusion's AutoencoderKL")
    if config.act_fn not in ("silu", "swish"):
      raise NotImplementedError(f"VAE: act_fn {config.act_fn!r} (supported: silu)")
    for channels in config.block_out_channels:
      if channels % config.norm_num_groups:
        raise ValueError(f"VAE config: {channels} channels are not divisible by "
                         f"norm_num_groups {config.norm_num_groups}")
    return config

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


class _VAEModule(nn.Module):
  config: VAEConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  remat_policy: str | None = None

  def settings(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

  def child_settings(self) -> dict[str, Any]:
    return dict(config=self.config, remat_policy=self.remat_policy, **self.settings())

  def resnet(self, in_channels: int, out_channels: int, name: str) -> nn.Module:
    return remat_layer(ResnetBlock2D, self.remat_policy)(
        in_channels, out_channels, groups=self.config.norm_num_groups, epsilon=VAE_EPSILON,
        use_time_embedding=False, name=name, **self.settings())

  def group_norm(self, name: str) -> nn.Module:
    return GroupNorm(num_groups=self.config.norm_num_groups, epsilon=VAE_EPSILON, name=name,
                     dtype=self.dtype, param_dtype=self.param_dtype)


class SpatialSelfAttention(_VAEModule):
  """The VAE mid block's `Attention` (diffusers' `_from_deprecated_attn_block`): GroupNorm,
  single-head attention over all pixels with biased `to_q/k/v/to_out_0`, plus the input."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    hidden = self.group_norm("group_norm")(x).reshape(batch, height * width, 1, channels)
    dense = lambda name, axes=("embed", "heads"): Linear(  # noqa: E731
        channels, kernel_axes=axes, name=name, **self.settings())
    query, key, value = dense("to_q")(hidden), dense("to_k")(hidden), dense("to_v")(hidden)
    attended = jax.nn.dot_product_attention(query.astype(jnp.float32), key.astype(jnp.float32),
                                            value.astype(jnp.float32))
    attended = attended.reshape(batch, height * width, channels).astype(x.dtype)
    output = dense("to_out_0", ("heads", "embed"))(attended)
    return output.reshape(x.shape) + x


class MidBlock(_VAEModule):
  """`UNetMidBlock2D` without time embedding: resnet, attention (optional), resnet."""

  channels: int = 512

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnet(self.channels, self.channels, "resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = SpatialSelfAttention(name="attentions_0", **self.child_settings())(x)
    return self.resnet(self.channels, self.channels, "resnets_1")(x)


class DownEncoderBlock2D(_VAEModule):
  """`layers_per_block` resnets, then a bottom/right-padded stride-2 conv unless last."""

  in_channels: int = 128
  out_channels: int = 128
  add_downsample: bool = True

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    for layer in range(self.config.layers_per_block):
      hidden = self.resnet(self.in_channels if layer == 0 else self.out_channels,
                           self.out_channels, f"resnets_{layer}")(hidden)
    if self.add_downsample:
      hidden = Downsample2D(self.out_channels, padding=0, name="downsamplers_0",
                            **self.settings())(hidden)
    return hidden


class UpDecoderBlock2D(_VAEModule):
  """`layers_per_block + 1` resnets, then nearest 2x + conv unless last."""

  in_channels: int = 512
  out_channels: int = 512
  add_upsample: bool = True

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    for layer in range(self.config.layers_per_block + 1):
      hidden = self.resnet(self.in_channels if layer == 0 else self.out_channels,
                           self.out_channels, f"resnets_{layer}")(hidden)
    if self.add_upsample:
      hidden = Upsample2D(self.out_channels, name="upsamplers_0", **self.settings())(hidden)
    return hidden


class Encoder(_VAEModule):
  """diffusers' `Encoder` (`double_z`): image `[B, H, W, in]` -> `[B, H/f, W/f, 2 * latent]`."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    config = self.config
    channels = config.block_out_channels
    hidden = Conv2d(channels[0], 3, padding=1, in_features=config.in_channels,
                    kernel_axes=CONV_AXES, name="conv_in", **self.settings())(images)
    output_channels = channels[0]
    for index in range(len(channels)):
      input_channels, output_channels = output_channels, channels[index]
      hidden = DownEncoderBlock2D(in_channels=input_channels, out_channels=output_channels,
                                  add_downsample=index < len(channels) - 1,
                                  name=f"down_blocks_{index}", **self.child_settings())(hidden)
    hidden = MidBlock(channels=channels[-1], name="mid_block", **self.child_settings())(hidden)
    hidden = nn.silu(self.group_norm("conv_norm_out")(hidden))
    return Conv2d(2 * config.latent_channels, 3, padding=1, in_features=channels[-1],
                  kernel_axes=CONV_AXES, name="conv_out", **self.settings())(hidden)


class Decoder(_VAEModule):
  """diffusers' `Decoder`: latents `[B, h, w, latent]` -> images `[B, h*f, w*f, out]`."""

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    config = self.config
    channels = config.block_out_channels[::-1]
    hidden = Conv2d(channels[0], 3, padding=1, in_features=config.latent_channels,
                    kernel_axes=CONV_AXES, name="conv_in", **self.settings())(latents)
    hidden = MidBlock(channels=channels[0], name="mid_block", **self.child_settings())(hidden)
    output_channels = channels[0]
    for index in range(len(channels)):
      input_channels, output_channels = output_channels, channels[index]
      hidden = UpDecoderBlock2D(in_channels=input_channels, out_channels=output_channels,
                                add_upsample=index < len(channels) - 1,
                                name=f"up_blocks_{index}", **self.child_settings())(hidden)
    hidden = nn.silu(self.group_norm("conv_norm_out")(hidden))
    return Conv2d(config.out_channels, 3, padding=1, in_features=channels[-1],
                  kernel_axes=CONV_AXES, name="conv_out", **self.settings())(hidden)


class AutoencoderKL(_VAEModule):
  """`encode(images) -> latent mean`, `decode(latents) -> images`; `__call__` round-trips
  through the mean (used for `init`)."""

  def setup(self):
    latent = self.config.latent_channels
    self.encoder = Encoder(**self.child_settings())
    self.decoder = Decoder(**self.child_settings())
    if self.config.use_quant_conv:
      self.quant_conv = Conv2d(2 * latent, 1, in_features=2 * latent, name="quant_conv",
                               **self.settings())
    if self.config.use_post_quant_conv:
      self.post_quant_conv = Conv2d(latent, 1, in_features=latent, name="post_quant_conv",
                                    **self.settings())

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))

  def encode_distribution(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`images [B, H, W, in]` in [-1, 1] -> `(mean, logvar)`, each `[B, H/f, W/f, latent]`."""
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"VAE: images must be [batch, height, width, {self.config.in_channels}]"
                       f", got shape {images.shape}")
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """The latent distribution's mean (`AutoencoderKL.encode(x).latent_dist.mean`)."""
    return self.encode_distribution(images)[0]

  def encode_sample(self, images: jax.Array, noise: jax.Array) -> jax.Array:
    """A latent sample `mean + exp(logvar / 2) * noise` (`latent_dist.sample()` with the
    standard-normal `noise [B, H/f, W/f, latent]` given explicitly)."""
    mean, logvar = self.encode_distribution(images)
    return mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)

  def decode(self, latents: jax.Array) -> jax.Array:
    """`latents [B, h, w, latent]` (unscaled) -> images `[B, h*f, w*f, out]` in about [-1, 1]."""
    if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
      raise ValueError(f"VAE: latents must be [batch, height, width, "
                       f"{self.config.latent_channels}], got shape {latents.shape}")
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)
