"""Fitting the image decoder's UNet to draw captions, for runs without Stable Diffusion's weights.

The release starts from SD 2.1's UNet, already trained to draw what CLIP's text encoder says,
and learns only to map the LLM's states into that conditioning (the image Q-Former, from
scratch). Where SD cannot be had (the built-in demo, no download), both ends of that path start
random: the UNet has no reason to read a conditioning that hardly varies with the caption, and
the Q-Former gets no gradient to make it vary. In the demo's 500 steps neither moves: the UNet's
error is the same with the right caption, another one or none (experiments/PERFORMANCE.md).

So the training command first fits the UNet as SD's was trained, a stand-in for that
pretraining: the training pictures' latents (through the already fitted VAE), each noised at a
uniform timestep, and the UNet predicts the noise from them and the picture's caption. The
caption reaches it through a stand-in for CLIP's text encoder, fitted with it: a learned
embedding of each word plus one of its position, `num_queries` tokens (SD's 77 tokens are the
release's 77 queries), padded with the pad word. With probability `uncond_prob` the caption is
the empty one, as SD trains for guidance. The stand-in encoder is then dropped, but its empty
caption's embedding initialises `neg_prompt_embeds`, as the release initialises it from SD's
empty-prompt embedding. The MMFS net takes no part (it adds nothing until trained: its output
convolutions start at zero). `config.train.unet_fit.steps = 0` (the default) skips this.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.data import pipeline, shapes, tokenizer
from mmi_jax.models.image_decoder import ImageDecoderConfig
from mmi_jax.models.unet import UNet2DConditionModel
from mmi_jax.models.vae import AutoencoderKL


def training_pairs(config: Any, batch_size: int, length: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(pictures [batch_size, Hd, Wd, 3] in [0, 1], caption ids [batch_size, length])` of the
  training documents' pictures and their own captions (`shapes.caption_of`), padded."""
  size = config.model.image_decoder.image_size
  tokens = config.model.tokens
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  for scenes in pipeline.training_scene_batches(config, batch_size):
    captions = np.full((batch_size, length), tokens.pad_id, np.int32)
    for row, scene in enumerate(scenes):
      ids = words.encode(shapes.caption_of(scene))
      if len(ids) > length:
        raise ValueError(f"unet fit: the caption {shapes.caption_of(scene)!r} has {len(ids)} "
                         f"tokens, more than the conditioning's {length} (image_decoder.qformer"
                         ".num_queries)")
      captions[row, :len(ids)] = ids
    pictures = np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32)
    yield pictures / 255, captions


def fit_unet(config: Any, decoder_params: Any, rng: jax.Array,
             log: Callable[[str], None] = print) -> tuple[Any, Any, dict[str, float]]:
  """`config.train.unet_fit.steps` Adam steps of the UNet and the stand-in text encoder on
  `|unet(noisy latents, t, encoder(caption)) - noise|^2`.

  Args:
    config: the whole config (`train.unet_fit`: steps, batch_size, learning_rate;
      `model.image_decoder`, whose VAE must already be fitted).
    decoder_params: the image decoder's params (`params["image_decoder"]`).
    rng: draws the stand-in encoder's init, the latent samples, noise, timesteps and which
      captions are emptied.
  Returns:
    `(unet params, neg_prompt_embeds [1, Q, D] or None where uncond_prob is 0, stats)`: float32
    host arrays, and the fit's last noise-prediction error.
  """
  fit = config.train.unet_fit
  decoder = ImageDecoderConfig.from_config(config.model)
  unet, vae = UNet2DConditionModel(decoder.unet), AutoencoderKL(decoder.vae, dtype=jnp.float32)
  schedule = decoder.noise_schedule
  length, width = decoder.qformer.num_queries, decoder.unet.cross_attention_dim
  vocab = int(config.model.tokens.text_vocab_size)
  pad_id = int(config.model.tokens.pad_id)
  embed_key, position_key, rng = jax.random.split(rng, 3)
  # Unit-scale word vectors, as a text encoder's normalised outputs; positions start small.
  encoder = {"words": jax.random.normal(embed_key, (vocab, width), jnp.float32),
             "positions": 0.1 * jax.random.normal(position_key, (length, width), jnp.float32)}
  vae_params = jax.device_get(decoder_params["decoder"]["vae"])
  optimizer = optax.adam(float(fit.learning_rate))

  def encode_captions(encoder, ids):
    return encoder["words"][ids] + encoder["positions"]

  def loss_fn(trained, latents, captions, key):
    noise_key, time_key, drop_key = jax.random.split(key, 3)
    noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    timesteps = jax.random.randint(time_key, (latents.shape[0],), 0,
                                   schedule.num_train_timesteps)
    emptied = jax.random.uniform(drop_key, (latents.shape[0],)) < decoder.uncond_prob
    captions = jnp.where(emptied[:, None], pad_id, captions)
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    prediction = unet.apply({"params": trained["unet"]}, noisy_latents, timesteps,
                            encode_captions(trained["encoder"], captions))
    target = schedule.training_target(latents, noise, timesteps)
    return jnp.mean(jnp.square(prediction - target))

  @jax.jit
  def step(trained, opt_state, pictures, captions, key):
    sample_key, loss_key = jax.random.split(key)
    pixels = pictures * 2.0 - 1.0
    latent_noise = jax.random.normal(sample_key, jax.eval_shape(
        lambda x: vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode),
        pixels).shape, jnp.float32)
    latents = decoder.vae.scaling_factor * vae.apply(
        {"params": vae_params}, pixels, latent_noise, method=AutoencoderKL.encode_sample)
    loss, grads = jax.value_and_grad(loss_fn)(trained, latents, captions, loss_key)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  trained = {"unet": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                  jax.device_get(decoder_params["decoder"]["unet"])),
             "encoder": encoder}
  opt_state = optimizer.init(trained)
  pairs = training_pairs(config, int(fit.batch_size), length)
  loss = float("nan")
  for index in range(int(fit.steps)):
    pictures, captions = next(pairs)
    trained, opt_state, loss = step(trained, opt_state, pictures, captions,
                                    jax.random.fold_in(rng, index))
    if index % 100 == 0 or index == fit.steps - 1:
      log(f"unet fit {index + 1}/{fit.steps}: noise-prediction error {float(loss):.5f}")
  negative = None
  if decoder.uncond_prob > 0:
    empty = jnp.full((length,), pad_id, jnp.int32)
    negative = encode_captions(trained["encoder"], empty)[None]
  trained = jax.device_get(trained)
  return trained["unet"], jax.device_get(negative), {"unet_fit_error": float(loss)}


__all__ = ["fit_unet", "training_pairs"]
