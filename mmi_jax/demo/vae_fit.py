"""Fitting the image decoder's VAE as an autoencoder, for runs without SD's pretrained VAE.

The release takes Stable Diffusion's VAE as it is and never trains it. Where those weights
cannot be had (the built-in demo, no download), a random VAE would make the diffusion loss
train on latents that decode to nothing; so the training command first fits the VAE on the
training pictures, as SD's VAE was fitted (reconstruction plus a small KL term towards the
standard normal, on latent samples), and then keeps it frozen, exactly as the release does.
`config.stand_ins.vae_fit.steps = 0` skips this.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.data import pipeline, shapes
from mmi_jax.demo import fit_loop
from mmi_jax.models.vae import AutoencoderKL, VAEConfig


def training_pictures(config: Any, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
  """Batches `[batch_size, Hd, Wd, 3]` in [0, 1] of the training documents' pictures."""
  size = config.model.image_decoder.image_size
  for scenes in pipeline.training_scene_batches(config, batch_size, seed_offset=seed):
    yield np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32) / 255


def fit_vae(config: Any, vae_params: Any, rng: jax.Array,
            log: Callable[[str], None] = print, record: fit_loop.Record | None = None,
            check_stop: fit_loop.CheckStop | None = None
            ) -> tuple[Any, dict[str, float]]:
  """`config.stand_ins.vae_fit.steps` Adam steps on `|decode(sample) - x|^2 + kl_weight * KL`.

  Args:
    config: the whole config (`stand_ins.vae_fit`: steps, batch_size, learning_rate,
      kl_weight, schedule, warmup_steps: `fit_loop.fit_schedule`; `model.image_decoder.vae`).
    vae_params: the VAE's params (`params["image_decoder"]["decoder"]["vae"]`).
    rng: draws the latent samples.
  Returns:
    `(params, stats)`: the fitted params (float32 host arrays) and the last reconstruction
    error and latent standard deviation.
  """
  settings = config.stand_ins.vae_fit
  vae = AutoencoderKL(VAEConfig.from_mapping(config.model.image_decoder.vae))
  schedule = fit_loop.fit_schedule(settings, "stand_ins.vae_fit")
  kl_weight = float(settings.kl_weight)

  def loss_fn(params, frozen, images, key):
    del frozen  # the whole VAE trains
    noise_shape = jax.eval_shape(
        lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode), params,
        images).shape
    noise = jax.random.normal(key, noise_shape, jnp.float32)
    pixels = images * 2.0 - 1.0
    mean, logvar = vae.apply({"params": params}, pixels, method=AutoencoderKL.encode_distribution)
    latents = mean + jnp.exp(0.5 * logvar) * noise
    reconstruction = vae.apply({"params": params}, latents, method=AutoencoderKL.decode)
    error = jnp.mean(jnp.square(reconstruction - pixels))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return error + kl_weight * kl, {"reconstruction_error": error, "latent_std": jnp.std(mean)}

  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.device_get(vae_params))
  params, metrics = fit_loop.fit(
      "vae fit", loss_fn, params, None, training_pictures(config, int(settings.batch_size)),
      steps=int(settings.steps), optimizer=optax.adam(schedule), rng=rng, log=log, record=record,
      check_stop=check_stop, schedule=schedule)
  stats = {"vae_reconstruction_error": metrics["reconstruction_error"],
           "vae_latent_std": metrics["latent_std"]}
  return jax.device_get(params), stats


__all__ = ["fit_vae", "training_pictures"]
