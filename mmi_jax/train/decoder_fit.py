"""Fitting the image decoder to draw captions, for runs without Stable Diffusion's weights.

The release starts from SD 2.1's UNet, already trained to draw what a text encoder says, and
its 15000 steps of large batches teach the image Q-Former (from scratch) to write that
conditioning from the LLM's states. Where SD cannot be had (the built-in demo, no download, a
few hundred small steps), both ends of the path start random: the UNet has no reason to read a
conditioning that hardly varies with the caption, and the Q-Former gets no gradient to make it
vary. Neither moves in the demo's 500 steps (experiments/PERFORMANCE.md): the UNet's error is
the same with the right caption, another one or none. Fitting the UNet alone first, through a
stand-in text encoder, does not help either: the from-scratch Q-Former still writes nothing the
UNet reads.

When configured, the training command first fits the image decoder's own path, Q-Former and
UNet together, as the release's training would shape it, with a stand-in for the LLM's
states: each training picture is drawn (noised at a uniform timestep; the UNet predicts the
noise) from the context of a caption-then-picture document, `<s>`, the caption's words and
soi, reversed (soi first), each token a learned vector of the LLM's width, plus the 1-D
sin-cos table the model adds
(`MMInterleaved._decoder_inputs`). With probability `uncond_prob` the conditioning is
`neg_prompt_embeds`, as in training. The latents come from the (already fitted, frozen) VAE;
the MMFS net takes no part (it adds nothing until trained: its output convolutions start at
zero). The stand-in vectors are then dropped: in training, `context_feat_proj` (a linear map,
from scratch as in the release) learns to write the LLM's states where the fitted Q-Former
reads them. `config.train.decoder_fit.steps = 0` (the default) skips this.

Measured on the demo (experiments/PERFORMANCE.md, fifth session) it has not yet made the
generated pictures follow their captions (1 of 16 at step 500, sharper shapes than without),
so `configs/demo.py` leaves it off.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.data import pipeline, shapes, tokenizer
from mmi_jax.models.image_decoder import ImageDecoder, ImageDecoderConfig
from mmi_jax.models.sincos import sincos_1d

# The image decoder's params the fit trains; the VAE (frozen) and the MMFS net are kept.
FITTED = ("perceiver_resampler", "neg_prompt_embeds")


def training_pairs(config: Any, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`(pictures [batch_size, Hd, Wd, 3] in [0, 1], context ids [batch_size, Lc], context mask
  [batch_size, Lc])` of the training documents' pictures, each with the context the model would
  give it after its own caption (`shapes.caption_of`): soi, the caption reversed and `<s>`,
  padded to `image_decoder.max_context_length`."""
  size = config.model.image_decoder.image_size
  length = int(config.model.image_decoder.max_context_length)
  tokens = config.model.tokens
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  for scenes in pipeline.training_scene_batches(config, batch_size):
    ids = np.full((batch_size, length), tokens.pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, scene in enumerate(scenes):
      context = [tokens.bos_id, *words.encode(shapes.caption_of(scene)), tokens.soi_id][::-1]
      if len(context) > length:
        raise ValueError(f"decoder fit: the context of {shapes.caption_of(scene)!r} has "
                         f"{len(context)} tokens, more than image_decoder.max_context_length "
                         f"{length}")
      ids[row, :len(context)], mask[row, :len(context)] = context, 1
    pictures = np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32)
    yield pictures / 255, ids, mask


def split_fitted(decoder_params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(fitted, kept)`: the Q-Former, `neg_prompt_embeds` and the UNet; the rest."""
  fitted = {name: decoder_params[name] for name in FITTED if name in decoder_params}
  fitted["unet"] = decoder_params["decoder"]["unet"]
  kept = {name: value for name, value in decoder_params.items() if name not in FITTED}
  kept["decoder"] = {name: value for name, value in decoder_params["decoder"].items()
                     if name != "unet"}
  return fitted, kept


def merge_fitted(fitted: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `split_fitted`."""
  merged = dict(kept, **{name: fitted[name] for name in FITTED if name in fitted})
  merged["decoder"] = dict(kept["decoder"], unet=fitted["unet"])
  return merged


def fit_decoder(config: Any, decoder_params: Any, rng: jax.Array,
                log: Callable[[str], None] = print) -> tuple[Any, dict[str, float]]:
  """`config.train.decoder_fit.steps` Adam steps of the Q-Former, `neg_prompt_embeds`, the
  UNet and the stand-in context vectors on the image decoder's diffusion loss.

  Args:
    config: the whole config (`train.decoder_fit`: steps, batch_size, learning_rate;
      `model.image_decoder`, whose VAE must already be fitted; `model.llm.hidden_size`).
    decoder_params: the image decoder's params (`params["image_decoder"]`).
    rng: draws the stand-in vectors and every draw of the loss.
  Returns:
    `(image decoder params, stats)`: float32 host arrays with the Q-Former,
    `neg_prompt_embeds` and the UNet fitted, and the fit's last noise-prediction error.
  """
  fit = config.train.decoder_fit
  decoder = ImageDecoder(ImageDecoderConfig.from_config(config.model))
  length = int(config.model.image_decoder.max_context_length)
  width = int(config.model.llm.hidden_size)
  vocab = int(config.model.tokens.vocab_size)
  table = jnp.asarray(sincos_1d(width, np.arange(length)))
  vectors_key, rng = jax.random.split(rng)
  fitted, kept = split_fitted(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                           jax.device_get(decoder_params)))
  # Unit-scale token vectors, as the LLM's (normalised) states through a fresh projection.
  trained = {"decoder": fitted, "context_vectors": jax.random.normal(vectors_key, (vocab, width))}
  optimizer = optax.adam(float(fit.learning_rate))

  def loss_fn(trained, pictures, ids, mask, key):
    context = trained["context_vectors"][ids] + table
    outputs = decoder.apply({"params": merge_fitted(trained["decoder"], kept)}, pictures,
                            context, mask, None, None, rng=key)
    return outputs["loss"]

  @jax.jit
  def step(trained, opt_state, pictures, ids, mask, key):
    loss, grads = jax.value_and_grad(loss_fn)(trained, pictures, ids, mask, key)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  opt_state = optimizer.init(trained)
  pairs = training_pairs(config, int(fit.batch_size))
  loss = float("nan")
  for index in range(int(fit.steps)):
    pictures, ids, mask = next(pairs)
    trained, opt_state, loss = step(trained, opt_state, pictures, ids, mask,
                                    jax.random.fold_in(rng, index))
    if index % 100 == 0 or index == fit.steps - 1:
      log(f"decoder fit {index + 1}/{fit.steps}: noise-prediction error {float(loss):.5f}")
  params = jax.device_get(merge_fitted(trained["decoder"], kept))
  return params, {"decoder_fit_error": float(loss)}


__all__ = ["fit_decoder", "merge_fitted", "split_fitted", "training_pairs"]
