"""Image generation with the image decoder: guided sampling and VAE decoding in one jit.

Mirrors the release's `ImageDecoder.generate_images` (`sd.py` with
`sd_pipeline_monkey_patch.py`): the Q-Former turns each image's context into conditioning,
the sampler (DDPM in the release, 30 steps) denoises Gaussian latents with classifier-free
guidance against `neg_prompt_embeds` (the unconditional and conditional halves run as one
batch, negative first, both seeing the same MMFS features), and the VAE decodes the result to
images in [0, 1].

The MMFS net's values depend only on the images, so they are projected once before the
sampling loop rather than at every step (the release recomputes them 2 x 30 times). The loop
itself is one `lax.scan` (`mmi_jax.diffusion.samplers`): one compilation for all steps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mmi_jax.diffusion import samplers
from mmi_jax.models.image_decoder import ImageDecoder


@functools.partial(jax.jit, static_argnames=("decoder", "num_steps", "sampler",
                                             "guidance_scale", "eta"))
def generate_latents(decoder: ImageDecoder, params: Any, context: jax.Array,
                     context_mask: jax.Array, mmfs_features: jax.Array | None,
                     mmfs_mask: jax.Array | None, rng: jax.Array | None = None, *,
                     num_steps: int = 30, guidance_scale: float = 7.5, sampler: str = "ddpm",
                     eta: float = 0.0, initial_latents: jax.Array | None = None,
                     step_noise: jax.Array | None = None) -> jax.Array:
  """Samples scaled latents `[B, h, w, latent]` for each image's context.

  Args:
    decoder: the `ImageDecoder` module.
    params: its params.
    context: `[B, Lc, E]` each image's context; `context_mask` `[B, Lc]`.
    mmfs_features: `[B, N, S, feature_dim]` the visible images' features (None: no MMFS);
      `mmfs_mask` `[B, N]`.
    rng: draws the initial latents (unless given) and the stochastic samplers' noise (unless
      `step_noise` is given).
    num_steps: denoising steps (30 in the release).
    guidance_scale: classifier-free guidance weight; <= 1 disables guidance, as diffusers.
    sampler: "ddpm" (the release's), "ddim" or "dpmsolver++".
    eta: DDIM's noise weight.
    initial_latents: `[B, h, w, latent]` standard-normal start (diffusers' `latents=`).
    step_noise: `[num_steps, B, h, w, latent]` explicit per-step noise of stochastic samplers.
  """
  variables = {"params": params}
  config = decoder.config
  batch = context.shape[0]
  conditioning = decoder.apply(variables, context, context_mask, method=ImageDecoder.condition)
  guided = guidance_scale > 1.0
  mmfs_values = None
  if mmfs_features is not None:
    mmfs_values = decoder.apply(variables, mmfs_features,
                                method=ImageDecoder.project_mmfs_features)
  if guided:
    negative = decoder.apply(variables, batch, method=ImageDecoder.negative_conditioning)
    conditioning = jnp.concatenate([negative.astype(conditioning.dtype), conditioning])
    if mmfs_values is not None:
      mmfs_values = tuple(jnp.concatenate([v, v]) for v in mmfs_values)
      mmfs_mask = jnp.concatenate([mmfs_mask, mmfs_mask])

  init_rng = noise_rng = None
  if rng is not None:
    init_rng, noise_rng = jax.random.split(rng)
  if initial_latents is None:
    if init_rng is None:
      raise ValueError("generate_latents: pass rng or initial_latents")
    shape = (batch, config.latent_size, config.latent_size, config.unet.in_channels)
    initial_latents = jax.random.normal(init_rng, shape, jnp.float32)

  def denoise(latents, timestep):
    inputs = jnp.concatenate([latents, latents]) if guided else latents
    output = decoder.apply(variables, inputs, timestep, conditioning, mmfs_values, mmfs_mask,
                           method=ImageDecoder.denoise).astype(jnp.float32)
    if not guided:
      return output
    unconditional, conditional = jnp.split(output, 2)
    return unconditional + guidance_scale * (conditional - unconditional)

  return samplers.sample(denoise, initial_latents, schedule=config.noise_schedule,
                         sampler=sampler, num_steps=num_steps,
                         rng=None if step_noise is not None else noise_rng,
                         step_noise=step_noise, eta=eta)


@functools.partial(jax.jit, static_argnames=("decoder",))
def decode_images(decoder: ImageDecoder, params: Any, latents: jax.Array) -> jax.Array:
  """Scaled latents -> images `[B, H, W, 3]` in [0, 1] (float32)."""
  return decoder.apply({"params": params}, latents, method=ImageDecoder.decode_latents)


def generate_images(decoder: ImageDecoder, params: Any, context: jax.Array,
                    context_mask: jax.Array, mmfs_features: jax.Array | None,
                    mmfs_mask: jax.Array | None, rng: jax.Array | None = None,
                    **sampling) -> jax.Array:
  """`generate_latents` then `decode_images`: images `[B, H, W, 3]` in [0, 1]."""
  latents = generate_latents(decoder, params, context, context_mask, mmfs_features, mmfs_mask,
                             rng, **sampling)
  return decode_images(decoder, params, latents)
