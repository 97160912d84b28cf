"""Stable Diffusion's denoising UNet (diffusers' `UNet2DConditionModel`, SD 1.x / 2.x family).

Mirrors `diffusers.models.unets.unet_2d_condition.UNet2DConditionModel` for the configurations
Stable Diffusion 1.x and 2.x use: sinusoidal time embedding, `CrossAttnDownBlock2D` /
`DownBlock2D` down blocks, `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D` up
blocks, `Transformer2DModel`s with a conv (SD 1.x) or linear (SD 2.x) projection, GEGLU
feed-forwards and per-block head counts. Anything else in a diffusers config (class or
addition embeddings, other block types, dropout, ...) is rejected by `UNetConfig`.

Maps are channels-last: `sample [B, H, W, C]`. Param names are diffusers' (`conv_in`,
`time_embedding/linear_1`, `down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`,
`up_blocks_3/resnets_2/conv_shortcut`, `conv_norm_out`, ...), so a diffusers state dict maps by
the `torch_names` rule (`down_blocks_0` <-> `down_blocks.0`).

The forward is split where MM-Interleaved's MMFS net acts (`sd_unet_forward_monkey_patch.py`:
after the mid block, before the up blocks): `down` returns the mid-block output, the skip
connections and the time embedding, `up` consumes them; `__call__` is `up(down(...))`, the
plain diffusers forward.

diffusers' naming quirk is kept: a config's `attention_head_dim` is used as the number of heads
per block when `num_attention_heads` is not set (SD 2.1: heads 5/10/20/20 of width 64).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax import sharding
from mmi_jax.models.conv import Conv2d
from mmi_jax.models.diffusers_config import config_from_mapping
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import GroupNorm, LayerNorm
from mmi_jax.models.remat import remat_layer
from mmi_jax.models.sd_blocks import CONV_AXES, MAP_AXES, Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The UNet's hyper-parameters, named as in a diffusers `unet/config.json`.

  `attention_head_dim` (an int or one per block) is the number of heads, as diffusers reads
  it, unless `num_attention_heads` is given. `transformer_layers_per_block` is an int or one
  per block.
  """

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 64
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 1024
  use_linear_projection: bool = False
  transformer_layers_per_block: int | tuple[int, ...] = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  center_input_sample: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False

  # diffusers config keys that must keep these values (anything else is another family).
  REQUIRED_DEFAULTS = {
      "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
      "time_embedding_type": "positional", "time_cond_proj_dim": None,
      "encoder_hid_dim": None, "encoder_hid_dim_type": None,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
      "conv_in_kernel": 3, "conv_out_kernel": 3, "timestep_post_act": None,
      "projection_class_embeddings_input_dim": None, "dual_cross_attention": False,
      "attention_type": "default", "reverse_transformer_layers_per_block": None,
      "dropout": 0.0, "cross_attention_norm": None, "class_embeddings_concat": False,
      "mid_block_only_cross_attention": None, "addition_time_embed_dim": None,
      "time_embedding_dim": None, "time_embedding_act_fn": None, "resnet_skip_time_act": False,
      "resnet_out_scale_factor": 1.0,
  }
  IGNORED = ("addition_embed_type_num_heads",)  # used only with an addition embedding

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any]) -> "UNetConfig":
    """From a config section (`config.model.image_decoder.unet`) or a diffusers config dict.

    Keys of other UNet families raise `NotImplementedError` naming them; unknown keys raise
    `ValueError` (`diffusers_config.config_from_mapping`).
    """
    config = config_from_mapping(
        cls, section, fixed=cls.REQUIRED_DEFAULTS, ignored=cls.IGNORED,
        family="the Stable Diffusion 1.x/2.x UNet2DConditionModel family")
    config.validate()
    return config

  def validate(self) -> None:
    blocks = len(self.block_out_channels)
    problems = []
    if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
      problems.append(f"{blocks} block_out_channels but {len(self.down_block_types)} down "
                      f"and {len(self.up_block_types)} up block types")
    for kind in self.down_block_types:
      if kind not in DOWN_BLOCK_TYPES:
        problems.append(f"down block type {kind!r} (supported: {DOWN_BLOCK_TYPES})")
    for kind in self.up_block_types:
      if kind not in UP_BLOCK_TYPES:
        problems.append(f"up block type {kind!r} (supported: {UP_BLOCK_TYPES})")
    if self.act_fn not in ("silu", "swish"):
      problems.append(f"act_fn {self.act_fn!r} (supported: silu)")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        problems.append(f"{channels} channels are not divisible by norm_num_groups "
                        f"{self.norm_num_groups}")
    for channels, heads in zip(self.block_out_channels, self.heads):
      if channels % heads:
        problems.append(f"{channels} channels are not divisible by {heads} heads")
    if problems:
      raise ValueError("UNet config: " + "; ".join(problems))

  def _per_block(self, value) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
      return tuple(value)
    return (value,) * len(self.block_out_channels)

  @property
  def heads(self) -> tuple[int, ...]:
    """Heads of each block's transformers (diffusers: `num_attention_heads or
    attention_head_dim`)."""
    return self._per_block(self.num_attention_heads if self.num_attention_heads is not None
                           else self.attention_head_dim)

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return self._per_block(self.transformer_layers_per_block)

  @property
  def time_embedding_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: float32 `[B, dim]` sinusoids of `timesteps [B]`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


class _UNetModule(nn.Module):
  """Attributes every UNet module shares."""

  config: UNetConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  attention_implementation: str | None = None
  remat_policy: str | None = None

  def settings(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

  def child_settings(self) -> dict[str, Any]:
    return dict(config=self.config, attention_implementation=self.attention_implementation,
                remat_policy=self.remat_policy, **self.settings())

  def resnet(self, in_channels: int, out_channels: int, name: str,
             output_scale_factor: float = 1.0) -> nn.Module:
    return remat_layer(ResnetBlock2D, self.remat_policy)(
        in_channels, out_channels, groups=self.config.norm_num_groups,
        epsilon=self.config.norm_eps, output_scale_factor=output_scale_factor, name=name,
        **self.settings())

  def transformer(self, channels: int, heads: int, layers: int, name: str) -> nn.Module:
    return remat_layer(Transformer2DModel, self.remat_policy)(
        channels=channels, heads=heads, layers=layers, name=name, **self.child_settings())


class Attention(_UNetModule):
  """diffusers' `Attention` as `BasicTransformerBlock` builds it: bias-free `to_q/k/v`,
  `to_out_0` with bias, scale `head_dim ** -0.5`. Self-attention without `context`.

  Attributes:
    heads: number of heads; the inner width is the query width.
  """

  heads: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """`x [B, T, C]`, `context [B, S, E]` (None: `x`) -> `[B, T, C]`."""
    width = x.shape[-1]
    context_axis = "embed" if context is None else "qformer_embed"
    context = x if context is None else context
    dense = lambda axes, name, **kw: Linear(width, kernel_axes=axes, name=name,  # noqa: E731
                                            **self.settings(), **kw)
    query = dense(("embed", "heads"), "to_q", use_bias=False)(x)
    key = dense((context_axis, "heads"), "to_k", use_bias=False)(context)
    value = dense((context_axis, "heads"), "to_v", use_bias=False)(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, width // self.heads))  # noqa: E731
    query, key, value = split(query), split(key), split(value)
    # One dtype for q, k and v (a float32 sample may attend to a bfloat16 context).
    common = (jnp.float32 if self.config.upcast_attention
              else jnp.result_type(query, key, value))
    query, key, value = (t.astype(common) for t in (query, key, value))
    attended = jax.nn.dot_product_attention(query, key, value,
                                            implementation=self.attention_implementation)
    attended = attended.reshape(x.shape[:2] + (width,)).astype(x.dtype)
    return dense(("heads", "embed"), "to_out_0")(attended)


class GEGLU(_UNetModule):
  """diffusers' `GEGLU`: `(h, g) = proj(x)` split in halves, `h * gelu(g)` (exact GELU)."""

  inner: int = 1280

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    projected = Linear(2 * self.inner, kernel_axes=("embed", "mlp"), name="proj",
                       **self.settings())(x)
    hidden, gate = jnp.split(projected, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(_UNetModule):
  """diffusers' `FeedForward` with GEGLU and a 4x inner width: `net_2(net_0(x))`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    hidden = GEGLU(inner=4 * width, name="net_0", **self.child_settings())(x)
    return Linear(width, kernel_axes=("mlp", "embed"), name="net_2", **self.settings())(hidden)


class BasicTransformerBlock(_UNetModule):
  """diffusers' `BasicTransformerBlock` (layer norms, eps 1e-5): self-attention (`attn1`),
  cross-attention into the conditioning (`attn2`), GEGLU feed-forward (`ff`), each pre-norm
  with a residual. With `only_cross_attention`, `attn1` attends to the conditioning too."""

  heads: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: LayerNorm(epsilon=1e-5, axis_name="embed", dtype=self.dtype,  # noqa: E731
                                  param_dtype=self.param_dtype, name=name)
    attention = lambda name: Attention(heads=self.heads, name=name,  # noqa: E731
                                       **self.child_settings())
    first_context = context if self.config.only_cross_attention else None
    x = x + attention("attn1")(norm("norm1")(x), first_context)
    x = x + attention("attn2")(norm("norm2")(x), context)
    feed_forward = FeedForward(name="ff", **self.child_settings())
    return x + feed_forward(norm("norm3")(x))


class Transformer2DModel(_UNetModule):
  """diffusers' `Transformer2DModel` on a map: GroupNorm (eps 1e-6), `proj_in` (a linear layer
  in SD 2.x, a 1x1 convolution in SD 1.x), `layers` transformer blocks, `proj_out`, plus the
  input as a residual."""

  channels: int = 320
  heads: int = 8
  layers: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """`x [B, H, W, C]`, `context [B, S, E]` -> `[B, H, W, C]`."""
    batch, height, width, channels = x.shape
    hidden = GroupNorm(num_groups=self.config.norm_num_groups, epsilon=1e-6, name="norm",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if self.config.use_linear_projection:
      project = lambda name: Linear(  # noqa: E731
          channels, kernel_axes=("embed", "query_proj") if name == "proj_in" else
          ("query_proj", "embed"), name=name, **self.settings())
    else:
      project = lambda name: Conv2d(channels, 1, in_features=channels,  # noqa: E731
                                    kernel_axes=CONV_AXES, name=name, **self.settings())
    # Linear and 1x1 conv act alike on channels-last maps, before or after flattening.
    hidden = project("proj_in")(hidden).reshape(batch, height * width, channels)
    for index in range(self.layers):
      hidden = BasicTransformerBlock(heads=self.heads, name=f"transformer_blocks_{index}",
                                     **self.child_settings())(hidden, context)
    hidden = project("proj_out")(hidden.reshape(batch, height, width, channels))
    return sharding.constrain(hidden + x, MAP_AXES)


class DownBlock(_UNetModule):
  """`CrossAttnDownBlock2D` (`has_attention`) or `DownBlock2D`: `layers_per_block` resnets
  (each followed by a transformer), then a stride-2 `downsamplers_0` unless last."""

  in_channels: int = 320
  out_channels: int = 320
  heads: int = 8
  transformer_layers: int = 1
  has_attention: bool = True
  add_downsample: bool = True

  def setup(self):
    count = self.config.layers_per_block
    self.resnets = [self.resnet(self.in_channels if i == 0 else self.out_channels,
                                self.out_channels, name=f"resnets_{i}") for i in range(count)]
    if self.has_attention:
      self.attentions = [self.transformer(self.out_channels, self.heads,
                                          self.transformer_layers, name=f"attentions_{i}")
                         for i in range(count)]
    if self.add_downsample:
      self.downsamplers = [Downsample2D(self.out_channels, self.config.downsample_padding,
                                        name="downsamplers_0", **self.settings())]

  def __call__(self, x, time_embedding, context) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Returns the block output and the skip connections it adds (one per resnet, plus the
    downsampled map)."""
    skips = []
    for index, resnet in enumerate(self.resnets):
      x = resnet(x, time_embedding)
      if self.has_attention:
        x = self.attentions[index](x, context)
      skips.append(x)
    if self.add_downsample:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(_UNetModule):
  """`UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer (one layer)."""

  channels: int = 1280
  heads: int = 8
  transformer_layers: int = 1

  def setup(self):
    scale = self.config.mid_block_scale_factor
    self.resnets = [self.resnet(self.channels, self.channels, name=f"resnets_{i}",
                                output_scale_factor=scale) for i in range(2)]
    self.attentions = [self.transformer(self.channels, self.heads, self.transformer_layers,
                                        name="attentions_0")]

  def __call__(self, x, time_embedding, context) -> jax.Array:
    x = self.resnets[0](x, time_embedding)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, time_embedding)


class UpBlock(_UNetModule):
  """`CrossAttnUpBlock2D` (`has_attention`) or `UpBlock2D`: `layers_per_block + 1` resnets on
  the input concatenated with a skip connection (last skip first), each followed by a
  transformer, then `upsamplers_0` (nearest 2x + conv) unless last."""

  in_channels: int = 320
  prev_output_channels: int = 320
  out_channels: int = 320
  heads: int = 8
  transformer_layers: int = 1
  has_attention: bool = True
  add_upsample: bool = True

  def setup(self):
    count = self.config.layers_per_block + 1
    resnets = []
    for i in range(count):
      skip_channels = self.in_channels if i == count - 1 else self.out_channels
      input_channels = self.prev_output_channels if i == 0 else self.out_channels
      resnets.append(self.resnet(input_channels + skip_channels, self.out_channels,
                                 name=f"resnets_{i}"))
    self.resnets = resnets
    if self.has_attention:
      self.attentions = [self.transformer(self.out_channels, self.heads,
                                          self.transformer_layers, name=f"attentions_{i}")
                         for i in range(count)]
    if self.add_upsample:
      self.upsamplers = [Upsample2D(self.out_channels, name="upsamplers_0", **self.settings())]

  def __call__(self, x, skips, time_embedding, context, upsample_size=None) -> jax.Array:
    """`skips`: this block's skip connections in the order the down path made them."""
    for index, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - index]], axis=-1), time_embedding)
      if self.has_attention:
        x = self.attentions[index](x, context)
    if self.add_upsample:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNet2DConditionModel(_UNetModule):
  """The denoiser: `(sample [B, H, W, in], timesteps [B] or scalar, context [B, S, E])` ->
  `[B, H, W, out]`, the prediction (noise or velocity) of diffusers' model."""

  def setup(self):
    config = self.config
    channels = config.block_out_channels
    heads, transformer_layers = config.heads, config.transformer_layers
    settings = self.settings()
    self.conv_in = Conv2d(channels[0], 3, padding=1, in_features=config.in_channels,
                          kernel_axes=CONV_AXES, name="conv_in", **settings)
    self.time_embedding = TimestepEmbedding(config.time_embedding_dim, name="time_embedding",
                                            **settings)
    down_blocks, output_channels = [], channels[0]
    for index, kind in enumerate(config.down_block_types):
      input_channels, output_channels = output_channels, channels[index]
      down_blocks.append(DownBlock(
          in_channels=input_channels, out_channels=output_channels, heads=heads[index],
          transformer_layers=transformer_layers[index],
          has_attention=kind == "CrossAttnDownBlock2D",
          add_downsample=index < len(channels) - 1, name=f"down_blocks_{index}",
          **self.child_settings()))
    self.down_blocks = down_blocks
    self.mid_block = MidBlock(channels=channels[-1], heads=heads[-1],
                              transformer_layers=transformer_layers[-1], name="mid_block",
                              **self.child_settings())
    reversed_channels = channels[::-1]
    up_blocks, output_channels = [], reversed_channels[0]
    for index, kind in enumerate(config.up_block_types):
      previous_channels, output_channels = output_channels, reversed_channels[index]
      input_channels = reversed_channels[min(index + 1, len(channels) - 1)]
      up_blocks.append(UpBlock(
          in_channels=input_channels, prev_output_channels=previous_channels,
          out_channels=output_channels, heads=heads[::-1][index],
          transformer_layers=transformer_layers[::-1][index],
          has_attention=kind == "CrossAttnUpBlock2D", add_upsample=index < len(channels) - 1,
          name=f"up_blocks_{index}", **self.child_settings()))
    self.up_blocks = up_blocks
    self.conv_norm_out = GroupNorm(num_groups=config.norm_num_groups, epsilon=config.norm_eps,
                                   dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="conv_norm_out")
    self.conv_out = Conv2d(config.out_channels, 3, padding=1, in_features=channels[0],
                           kernel_axes=(None, None), name="conv_out", **settings)

  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    """diffusers' forward: `[B, H, W, in]` -> `[B, H, W, out]`."""
    hidden, skips, time_embedding = self.down(sample, timesteps, encoder_hidden_states)
    return self.up(hidden, skips, time_embedding, encoder_hidden_states)

  def down(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array
           ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
    """Time embedding, `conv_in`, the down blocks and the mid block.

    Args:
      sample: `[B, H, W, in_channels]` noisy latents.
      timesteps: `[B]` or a scalar (broadcast to the batch), integer or float.
      encoder_hidden_states: `[B, S, cross_attention_dim]` conditioning.

    Returns:
      `(mid-block output [B, H / f, W / f, C_last], skip connections, time embedding [B, T])`;
      the skips are `conv_in`'s output and every down resnet/downsampler output, in order
      (diffusers' `down_block_res_samples`).
    """
    config = self.config
    if sample.ndim != 4 or sample.shape[-1] != config.in_channels:
      raise ValueError(f"UNet: sample must be [batch, height, width, {config.in_channels}], "
                       f"got shape {sample.shape}")
    if encoder_hidden_states.ndim != 3 or (
        encoder_hidden_states.shape[-1] != config.cross_attention_dim):
      raise ValueError(f"UNet: encoder_hidden_states must be [batch, tokens, "
                       f"{config.cross_attention_dim}], got {encoder_hidden_states.shape}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    if config.center_input_sample:
      sample = 2 * sample - 1.0
    dtype = self.dtype or sample.dtype
    time_features = timestep_embedding(timesteps, config.block_out_channels[0],
                                       config.flip_sin_to_cos, config.freq_shift)
    time_embedding = self.time_embedding(time_features.astype(dtype))
    hidden = sharding.constrain(self.conv_in(sample), MAP_AXES)
    skips = (hidden,)
    for block in self.down_blocks:
      hidden, block_skips = block(hidden, time_embedding, encoder_hidden_states)
      skips += block_skips
    hidden = self.mid_block(hidden, time_embedding, encoder_hidden_states)
    return hidden, skips, time_embedding

  def up(self, hidden: jax.Array, skips: Sequence[jax.Array], time_embedding: jax.Array,
         encoder_hidden_states: jax.Array) -> jax.Array:
    """The up blocks on `down`'s outputs (possibly modified, e.g. by MMFS), then
    `conv_norm_out`, SiLU and `conv_out`."""
    skips = tuple(skips)
    # diffusers forwards each skip's size to the upsamplers when the map is not a multiple of
    # the total downsampling, so odd sizes round-trip.
    factor = self.config.downsampling_factor
    forward_size = any(size % factor for size in skips[0].shape[1:3])
    count = self.config.layers_per_block + 1
    for index, block in enumerate(self.up_blocks):
      block_skips, skips = skips[-count:], skips[:-count]
      is_last = index == len(self.up_blocks) - 1
      upsample_size = tuple(skips[-1].shape[1:3]) if forward_size and not is_last else None
      hidden = block(hidden, block_skips, time_embedding, encoder_hidden_states,
                     upsample_size)
    hidden = nn.silu(self.conv_norm_out(hidden))
    return self.conv_out(hidden)


class TimestepEmbedding(nn.Module):
  """diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(t)))`."""

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, time_features: jax.Array) -> jax.Array:
    settings = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    hidden = Linear(self.features, kernel_axes=(None, "mlp"), name="linear_1",
                    **settings)(time_features)
    return Linear(self.features, kernel_axes=("mlp", None), name="linear_2",
                  **settings)(nn.silu(hidden))
