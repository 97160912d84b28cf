"""MM-Interleaved's image decoder: Q-Former conditioning, Stable Diffusion and the MMFS net.

Mirrors `mm_interleaved/models/decoders/decoder_image.py` (`ImageDecoder`) and `sd.py`
(`StableDiffusion`) with `sd_unet_forward_monkey_patch.py` (SPEC 7):

  * `condition`: a 1-layer Q-Former (`perceiver_resampler`) with 77 learned queries reads the
    image's context (the LLM's hidden states from the document's `<s>` to the image's soi,
    reversed, projected, with a 1-D sin-cos table; built by the caller) -> `[B, 77, 1024]`;
  * `denoise`: the SD UNet, with the MMFS net adding residuals from the previous image's
    multi-scale features after the mid block (`UNet2DConditionModel.down` -> `MMFSNet` ->
    `UNet2DConditionModel.up`);
  * `__call__`: the training loss. Images in [0, 1] go to [-1, 1], through the frozen VAE
    (a latent *sample*, as the release's `latent_dist.sample()`) and the scaling factor; DDPM
    noising at uniform timesteps; with probability `uncond_prob` the conditioning is replaced
    by `neg_prompt_embeds`; MSE against the scheduler's target (noise or velocity).

Loss masks, as the release: an image counts only if its context is longer than `[<s>, soi]`
(`context_mask.sum() > 2`) and its optional `image_loss_mask` is set. The loss is the mean of
the masked per-element squared errors over all images (masked ones count as zeros, as the
release's `(loss * mask).mean()`); static-shape padding slots (`image_valid` False) are left
out of that mean, so padding never changes the loss.

Every random draw comes from the explicit `rng` argument, and each can instead be given
explicitly (`latent_noise`, `noise`, `timesteps`, `uncond_mask`).

Params follow the release: `perceiver_resampler/{queries, blip2qformer/...}`,
`neg_prompt_embeds`, `decoder/{unet, vae, mmfs_module}/...`. The VAE is frozen, as are the MMFS
net's `pos_embed` and `ignore_token` (`FROZEN_PATTERNS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax.diffusion.noise_schedule import NoiseSchedule
from mmi_jax.models.mmfs_net import MMFSNet, MMFSNetConfig
from mmi_jax.models.qformer import PerceiverResampler, QFormerConfig
from mmi_jax.models.unet import UNet2DConditionModel, UNetConfig
from mmi_jax.models.vae import AutoencoderKL, VAEConfig

# Param paths (regular expressions over '/'-joined paths) the release never trains.
FROZEN_PATTERNS = (
    r"^decoder/vae/",
    r"^decoder/mmfs_module/[^/]+/pos_embed$",
    r"^decoder/mmfs_module/[^/]+/mmfs/ignore_token$",
)


@dataclasses.dataclass(frozen=True)
class ImageDecoderConfig:
  """The image decoder's settings (a config's `model.image_decoder` section).

  Attributes:
    image_size: side of the generated images (512; the latents are `image_size / 8`).
    uncond_prob: training probability of replacing the conditioning by `neg_prompt_embeds`;
      0 builds no `neg_prompt_embeds` (as the release), which rules out guidance.
    qformer, unet, vae, mmfs: the parts' settings.
    noise_schedule: the training (DDPM) schedule, also the samplers' schedule.
  """

  image_size: int
  uncond_prob: float
  qformer: QFormerConfig
  unet: UNetConfig
  vae: VAEConfig
  mmfs: MMFSNetConfig
  noise_schedule: NoiseSchedule

  @classmethod
  def from_config(cls, model_config: Any) -> "ImageDecoderConfig":
    """From a model config (`config.model`): its `image_decoder` section, and the vision
    encoder's width as the MMFS features' width."""
    section = model_config.image_decoder
    config = cls(
        image_size=section.image_size, uncond_prob=float(section.uncond_prob),
        qformer=QFormerConfig.from_mapping(section.qformer),
        unet=UNetConfig.from_mapping(section.unet),
        vae=VAEConfig.from_mapping(section.vae),
        mmfs=MMFSNetConfig.from_mapping(
            section.mmfs, feature_dim=model_config.vision_encoder.hidden_size),
        noise_schedule=NoiseSchedule.from_mapping(section.noise_schedule))
    config.validate()
    return config

  def validate(self) -> None:
    problems = []
    if self.qformer.hidden_size != self.unet.cross_attention_dim:
      problems.append(f"the Q-Former's width {self.qformer.hidden_size} is not the UNet's "
                      f"cross_attention_dim {self.unet.cross_attention_dim}")
    if self.vae.latent_channels != self.unet.in_channels:
      problems.append(f"the VAE's {self.vae.latent_channels} latent channels are not the "
                      f"UNet's {self.unet.in_channels} input channels")
    if self.image_size % self.vae.downsampling_factor:
      problems.append(f"image_size {self.image_size} is not a multiple of the VAE's "
                      f"downsampling {self.vae.downsampling_factor}")
    if problems:
      raise ValueError("image decoder config: " + "; ".join(problems))

  @property
  def latent_size(self) -> int:
    return self.image_size // self.vae.downsampling_factor


class StableDiffusion(nn.Module):
  """The release's `StableDiffusion` (`decoder`): `unet`, frozen `vae`, `mmfs_module`."""

  config: ImageDecoderConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  attention_implementation: str | None = None
  remat_policy: str | None = None

  def setup(self):
    settings = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    unet = self.config.unet
    self.unet = UNet2DConditionModel(unet, attention_implementation=self.attention_implementation,
                                     remat_policy=self.remat_policy, **settings)
    # The VAE runs in float32 (the release casts it: `self.vae.float()`).
    self.vae = AutoencoderKL(self.config.vae, dtype=jnp.float32, param_dtype=self.param_dtype,
                             precision=self.precision, remat_policy=self.remat_policy)
    self.mmfs_module = MMFSNet(self.config.mmfs, unet.block_out_channels, unet.layers_per_block,
                               remat_policy=self.remat_policy, **settings)

  def project_mmfs_features(self, features: jax.Array) -> tuple[jax.Array, ...]:
    """`features [B, N, S, feature_dim]` -> each MMFS block's values (`MMFSNet.project_values`)."""
    return self.mmfs_module.project_values(features)

  def denoise(self, noisy_latents: jax.Array, timesteps: jax.Array, conditioning: jax.Array,
              mmfs_values: tuple[jax.Array, ...] | None, mmfs_mask: jax.Array | None
              ) -> jax.Array:
    """The UNet's prediction with the MMFS net's residuals.

    Args:
      noisy_latents: `[B, h, w, latent]` (scaled latents).
      timesteps: `[B]` or a scalar.
      conditioning: `[B, Q, cross_attention_dim]`.
      mmfs_values: `project_mmfs_features(features)`; None runs the plain UNet (no MMFS net).
      mmfs_mask: `[B, N]`, which feature slots are visible.
    """
    hidden, skips, time_embedding = self.unet.down(noisy_latents, timesteps, conditioning)
    if mmfs_values is not None:
      hidden, skips = self.mmfs_module.add_residuals(hidden, skips, mmfs_values, mmfs_mask)
    return self.unet.up(hidden, skips, time_embedding, conditioning)

  def encode_latents(self, images: jax.Array, noise: jax.Array | None) -> jax.Array:
    """Images `[B, H, W, 3]` in [0, 1] -> scaled latents; a sample with `noise`, else the mean."""
    images = images.astype(jnp.float32) * 2.0 - 1.0
    if noise is None:
      latents = self.vae.encode(images)
    else:
      latents = self.vae.encode_sample(images, noise)
    return latents * self.config.vae.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images `[B, H, W, 3]` in [0, 1] (clipped), float32."""
    images = self.vae.decode(latents.astype(jnp.float32) / self.config.vae.scaling_factor)
    return jnp.clip(images / 2.0 + 0.5, 0.0, 1.0)


class ImageDecoder(nn.Module):
  """The release's `ImageDecoder`.

  Attributes:
    config: `ImageDecoderConfig`.
    dtype: computation dtype of the Q-Former, UNet and MMFS net (the VAE runs in float32).
    param_dtype: storage dtype of the params.
    precision: matmul precision.
    attention_implementation: for the UNet's attention (`jax.nn.dot_product_attention`).
    remat_policy: rematerialise UNet resnets/transformers, MMFS blocks and VAE resnets.
  """

  config: ImageDecoderConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  attention_implementation: str | None = None
  remat_policy: str | None = None

  @classmethod
  def from_config(cls, model_config: Any, **attributes) -> "ImageDecoder":
    """From a model config (`config.model`; `ImageDecoderConfig.from_config`)."""
    return cls(ImageDecoderConfig.from_config(model_config), **attributes)

  def setup(self):
    config = self.config
    self.perceiver_resampler = PerceiverResampler(config.qformer, dtype=self.dtype,
                                                  param_dtype=self.param_dtype,
                                                  precision=self.precision)
    if config.uncond_prob > 0:
      # The release overwrites this N(0, 0.02) draw with SD's empty-prompt embedding
      # (`convert.diffusers.empty_prompt_embedding`).
      self.neg_prompt_embeds = self.param(
          "neg_prompt_embeds",
          nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                       (None, None, "qformer_embed")),
          (1, config.qformer.num_queries, config.qformer.hidden_size), self.param_dtype)
    self.decoder = StableDiffusion(config, dtype=self.dtype, param_dtype=self.param_dtype,
                                   precision=self.precision,
                                   attention_implementation=self.attention_implementation,
                                   remat_policy=self.remat_policy)

  def condition(self, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    """The UNet's conditioning `[B, Q, D]` from each image's context `[B, Lc, E]` and its
    mask `[B, Lc]` (1 = real token)."""
    return self.perceiver_resampler(context, context_mask)

  def negative_conditioning(self, batch: int) -> jax.Array:
    """`neg_prompt_embeds` for `batch` images, `[batch, Q, D]` (classifier-free guidance)."""
    if self.config.uncond_prob <= 0:
      raise ValueError("ImageDecoder: uncond_prob is 0, so there is no neg_prompt_embeds to "
                       "guide against (the release builds it only when uncond_prob > 0)")
    embeds = self.neg_prompt_embeds
    return jnp.broadcast_to(embeds, (batch,) + embeds.shape[1:])

  def project_mmfs_features(self, features: jax.Array) -> tuple[jax.Array, ...]:
    """See `StableDiffusion.project_mmfs_features`."""
    return self.decoder.project_mmfs_features(features)

  def denoise(self, noisy_latents, timesteps, conditioning, mmfs_values, mmfs_mask):
    """See `StableDiffusion.denoise`."""
    return self.decoder.denoise(noisy_latents, timesteps, conditioning, mmfs_values, mmfs_mask)

  def encode_latents(self, images: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """See `StableDiffusion.encode_latents`."""
    return self.decoder.encode_latents(images, noise)

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """See `StableDiffusion.decode_latents`."""
    return self.decoder.decode_latents(latents)

  def __call__(self, images: jax.Array, context: jax.Array, context_mask: jax.Array,
               mmfs_features: jax.Array | None, mmfs_mask: jax.Array | None,
               image_loss_mask: jax.Array | None = None, image_valid: jax.Array | None = None,
               *, rng: jax.Array | None = None, latent_noise: jax.Array | None = None,
               noise: jax.Array | None = None, timesteps: jax.Array | None = None,
               uncond_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """The diffusion training loss of a batch of images.

    Args:
      images: `[B, H, W, 3]` in [0, 1], `H = W = image_size`.
      context: `[B, Lc, E]` each image's context (see the module docstring).
      context_mask: `[B, Lc]`, 1 on real context tokens.
      mmfs_features: `[B, N, S, feature_dim]` the visible images' multi-scale features
        (scales flattened and concatenated, finest first); None: no MMFS net.
      mmfs_mask: `[B, N]`, 1 where a feature slot holds a visible image.
      image_loss_mask: optional `[B]`, 0 excludes an image from the loss.
      image_valid: optional `[B]`, False for padding slots (left out of the mean).
      rng: key for every draw not given explicitly.
      latent_noise: `[B, h, w, latent]` the VAE sample's noise.
      noise: `[B, h, w, latent]` the diffusion noise.
      timesteps: int `[B]` in `[0, num_train_timesteps)`.
      uncond_mask: bool `[B]`, True where the conditioning is replaced by
        `neg_prompt_embeds`.

    Returns:
      `{"loss": scalar, "per_image_loss": [B] (unmasked MSE of each image),
        "loss_weight": [B] (1 where the image counts)}`.
    """
    config = self.config
    batch = images.shape[0]
    expected = (batch, config.image_size, config.image_size, 3)
    if images.shape != expected:
      raise ValueError(f"ImageDecoder: images must be {expected} (image_size "
                       f"{config.image_size}), got {images.shape}")
    if context.shape[0] != batch or context_mask.shape != context.shape[:2]:
      raise ValueError(f"ImageDecoder: context {context.shape} and context_mask "
                       f"{context_mask.shape} must be [{batch}, Lc, E] and [{batch}, Lc]")
    keys = dict(zip(("latent_noise", "noise", "timesteps", "uncond"),
                    jax.random.split(rng, 4))) if rng is not None else {}

    def draw(name, given, sample):
      if given is not None:
        return given
      if rng is None:
        raise ValueError(f"ImageDecoder: pass rng, or {name} explicitly")
      return sample(keys[name])

    latent_shape = (batch, config.latent_size, config.latent_size, config.vae.latent_channels)
    latent_noise = draw("latent_noise", latent_noise,
                        lambda key: jax.random.normal(key, latent_shape, jnp.float32))
    latents = jax.lax.stop_gradient(self.decoder.encode_latents(images, latent_noise))
    if self.is_initializing():  # create the VAE decoder's params, which the loss never uses
      self.decode_latents(latents)
    noise = draw("noise", noise, lambda key: jax.random.normal(key, latent_shape, jnp.float32))
    schedule = config.noise_schedule
    timesteps = draw("timesteps", timesteps, lambda key: jax.random.randint(
        key, (batch,), 0, schedule.num_train_timesteps))
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    target = schedule.training_target(latents, noise, timesteps)

    conditioning = self.condition(context, context_mask)
    if config.uncond_prob > 0:
      uncond_mask = draw("uncond", uncond_mask, lambda key: jax.random.uniform(
          key, (batch,)) < config.uncond_prob)
      negative = self.negative_conditioning(batch).astype(conditioning.dtype)
      conditioning = jnp.where(uncond_mask[:, None, None], negative, conditioning)

    mmfs_values = None
    if mmfs_features is not None:
      mmfs_values = self.project_mmfs_features(mmfs_features)
    prediction = self.denoise(noisy_latents.astype(self.dtype or jnp.float32), timesteps,
                              conditioning, mmfs_values, mmfs_mask)

    squared_error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_image_loss = jnp.mean(squared_error, axis=(1, 2, 3))
    # The release's `is_cond_image`: the context holds more than [<s>, soi].
    weight = (jnp.sum(context_mask != 0, axis=1) > 2).astype(jnp.float32)
    if image_loss_mask is not None:
      weight = weight * (image_loss_mask != 0)
    valid = (jnp.ones((batch,), jnp.float32) if image_valid is None
             else (image_valid != 0).astype(jnp.float32))
    weight = weight * valid
    loss = jnp.sum(per_image_loss * weight) / jnp.maximum(jnp.sum(valid), 1.0)
    return {"loss": loss, "per_image_loss": per_image_loss, "loss_weight": weight}
