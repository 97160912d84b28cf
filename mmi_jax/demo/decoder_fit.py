"""Fitting the image decoder to draw captions, for runs without Stable Diffusion's weights.

The release starts from SD 2.1's UNet, already trained to draw what a text encoder says, and
its 15000 steps of large batches teach the image Q-Former (from scratch) to write that
conditioning from the LLM's states. Where SD cannot be had (the built-in demo, no download, a
few hundred small steps), both ends of the path start random: the UNet has no reason to read a
conditioning that hardly varies with the caption, and the Q-Former gets no gradient to make it
vary.

So the demo fits the image decoder's own path, Q-Former and UNet together, as the release's
training would shape it: each training picture is drawn (noised at a uniform timestep; the
UNet predicts the schedule's target) from the context of a caption-then-picture document,
`<s>`, the caption's words and soi, reversed (soi first), as the model builds it
(`MMInterleaved.decoder_contexts`). With probability `uncond_prob` the conditioning is
`neg_prompt_embeds`, as in training. The latents come from the (already fitted, frozen) VAE;
the MMFS net takes no part (it adds nothing until trained: its output convolutions start at
zero). Where the context's states come from is the settings' `context`:
  * "stand_in": each token a learned vector of the LLM's width, dropped after the fit; in
    training, `context_feat_proj` (from scratch, as in the release) must learn to write the
    LLM's states where the fitted Q-Former reads them.
  * "llm": the model's own LLM, frozen, on `<s> caption soi`, through `context_feat_proj`,
    which the fit trains too.
`stand_ins.decoder_fit` runs before training (after the vision encoder, the VAE and the
LLM); `stand_ins.decoder_fit_after_training` is the same fit after the last train step,
through the trained LLM (context "llm"), as SD's UNet was trained on a frozen, trained text
encoder's states. `steps = 0` skips either.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.command_line import UsageError
from mmi_jax.data import pipeline, shapes, tokenizer
from mmi_jax.demo import fit_loop
from mmi_jax.demo.llm_fit import LANGUAGE_PARAMS
from mmi_jax.models.image_decoder import ImageDecoder
from mmi_jax.models.mm_interleaved import MMInterleaved
from mmi_jax.models.sincos import sincos_1d

# The image decoder's params the fit trains; the VAE (frozen) and the MMFS net are kept.
FITTED = ("perceiver_resampler", "neg_prompt_embeds")
CONTEXTS = ("stand_in", "llm")  # the settings' `context`


def check_settings(settings: Any, where: str) -> None:
  """Raises ValueError naming a setting of a decoder fit's `settings` (the config section
  `where`) that cannot work."""
  if settings.context not in CONTEXTS:
    raise UsageError(f"{where}.context must be one of {CONTEXTS}, got {settings.context!r}")
  fit_loop.fit_schedule(settings, where)


def after_training_settings(config: Any) -> Any:
  """`stand_ins.decoder_fit_after_training` as decoder fit settings (context "llm")."""
  settings = config.stand_ins.decoder_fit.copy_and_resolve_references()
  settings.update(dict(config.stand_ins.decoder_fit_after_training), context="llm")
  return settings


def training_pairs(config: Any, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`(pictures [batch_size, Hd, Wd, 3] in [0, 1], context ids [batch_size, Lc], context mask
  [batch_size, Lc])` of the training documents' pictures, each with the context the model would
  give it after its own caption (`shapes.caption_of`): soi, the caption reversed and `<s>`,
  padded to `image_decoder.max_context_length`."""
  size = config.model.image_decoder.image_size
  for scenes in pipeline.training_scene_batches(config, batch_size):
    ids, mask = caption_contexts(config, scenes)
    pictures = np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32)
    yield pictures / 255, ids, mask


def caption_contexts(config: Any, scenes: list[shapes.Scene]) -> tuple[np.ndarray, np.ndarray]:
  """`(ids [N, Lc], mask [N, Lc])`: each scene's context after its own caption (soi, the
  caption reversed, `<s>`), padded to `image_decoder.max_context_length`."""
  length = int(config.model.image_decoder.max_context_length)
  tokens = config.model.tokens
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  ids = np.full((len(scenes), length), tokens.pad_id, np.int32)
  mask = np.zeros((len(scenes), length), np.int32)
  for row, scene in enumerate(scenes):
    context = [tokens.bos_id, *words.encode(shapes.caption_of(scene)), tokens.soi_id][::-1]
    if len(context) > length:
      raise ValueError(f"decoder fit: the context of {shapes.caption_of(scene)!r} has "
                       f"{len(context)} tokens, more than image_decoder.max_context_length "
                       f"{length}")
    ids[row, :len(context)], mask[row, :len(context)] = context, 1
  return ids, mask


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


def forward_order(ids: jax.Array, mask: jax.Array) -> jax.Array:
  """`ids [B, Lc]` of contexts in the decoder's order (soi first, left-aligned, `mask` 1 on
  the real ones) -> the same tokens in reading order (`<s>` first), left-aligned."""
  lengths = jnp.sum(mask, axis=1, keepdims=True)
  positions = jnp.clip(lengths - 1 - jnp.arange(ids.shape[1])[None, :], 0, ids.shape[1] - 1)
  return jnp.where(mask == 1, jnp.take_along_axis(ids, positions, axis=1), ids)


def _context_source(config: Any, settings: Any, params: Any, rng: jax.Array
                    ) -> tuple[dict[str, Any], dict[str, Any], Callable[..., jax.Array]]:
  """`(trained, frozen, context)`: the context's trainable params, what it reads but keeps,
  and `context(trained, frozen, ids, mask)` -> `[B, Lc, llm.hidden_size]`, for
  `settings.context`."""
  length = int(config.model.image_decoder.max_context_length)
  width = int(config.model.llm.hidden_size)
  if settings.context == "stand_in":
    # Unit-scale token vectors, as the LLM's (normalised) states through a fresh projection.
    vectors = jax.random.normal(rng, (int(config.model.tokens.vocab_size), width))
    table = jnp.asarray(sincos_1d(width, np.arange(length)))
    return {"context_vectors": vectors}, {}, lambda trained, frozen, ids, mask: (
        trained["context_vectors"][ids] + table)

  model = MMInterleaved.from_config(config.model)

  def context(trained, frozen, ids, mask):
    hidden = model.language.apply({"params": frozen}, forward_order(ids, mask),
                                  mask)["hidden_states"]
    batch = ids.shape[0]
    states, _ = model.apply({"params": trained}, hidden, jnp.arange(batch),
                            jnp.sum(mask, axis=1) - 1, jnp.zeros((batch,), jnp.int32),
                            method=MMInterleaved.decoder_contexts)
    return states

  return ({"context_feat_proj": params["context_feat_proj"]},
          {name: params[name] for name in LANGUAGE_PARAMS}, context)


def fit_image_decoder(config: Any, params: Any, rng: jax.Array, settings: Any, where: str,
                      log: Callable[[str], None] = print,
                      record: fit_loop.Record | None = None,
                      check_stop: fit_loop.CheckStop | None = None
                      ) -> tuple[dict[str, Any], float]:
  """The fit itself: `settings.steps` Adam steps of the Q-Former, `neg_prompt_embeds`, the
  UNet and the context's trainable params on the diffusion loss.

  Args:
    params: the whole model's params (for "stand_in", `{"image_decoder": ...}` suffices).
    settings: the fit's settings (steps, batch_size, learning_rate, schedule, warmup_steps:
      see `fit_loop.fit_schedule`; context), the config section `where`.
  Returns:
    `(trained, error)`: `trained["image_decoder"]` the image decoder's params (device arrays)
    and, by `settings.context`, `trained["context_vectors"]` `[vocab_size, llm.hidden_size]`
    (a context of ids `ids` is `context_vectors[ids] + sincos_1d(hidden_size, positions)`)
    or `trained["context_feat_proj"]`; the last step's error.
  """
  check_settings(settings, where)
  decoder = ImageDecoder.from_config(config.model)
  source_key, rng = jax.random.split(rng)
  as_float32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
  fitted, kept = split_fitted(as_float32(jax.device_get(params["image_decoder"])))
  needed = ("context_feat_proj", *LANGUAGE_PARAMS)  # what "llm" reads
  trained_context, frozen_context, context = _context_source(
      config, settings, as_float32({name: params[name] for name in needed if name in params}),
      source_key)
  schedule = fit_loop.fit_schedule(settings, where)

  def loss_fn(trained, frozen, batch, key):
    pictures, ids, mask = batch
    conditioning = context(trained["context"], frozen["context"], ids, mask)
    outputs = decoder.apply({"params": merge_fitted(trained["decoder"], frozen["decoder"])},
                            pictures, conditioning, mask, None, None, rng=key)
    return outputs["loss"], {}

  trained, metrics = fit_loop.fit(
      "decoder fit", loss_fn, {"decoder": fitted, "context": trained_context},
      {"decoder": kept, "context": frozen_context},
      training_pairs(config, int(settings.batch_size)), steps=int(settings.steps),
      optimizer=optax.adam(schedule), rng=rng, log=log, schedule=schedule, record=record,
      check_stop=check_stop)
  return dict(trained["context"], image_decoder=merge_fitted(trained["decoder"], kept)), (
      metrics["loss"])


def fit_decoder(config: Any, params: Any, rng: jax.Array, settings: Any, where: str,
                log: Callable[[str], None] = print, record: fit_loop.Record | None = None,
                check_stop: fit_loop.CheckStop | None = None
                ) -> tuple[Any, dict[str, float]]:
  """`fit_image_decoder`, keeping what the model has (stand-in vectors are dropped).

  Args:
    config: the whole config (`model.image_decoder`, whose VAE must already be fitted;
      `model.llm`).
    params: the whole model's params.
    rng: draws the stand-in vectors and every draw of the loss.
    settings, where: the fit's settings (`stand_ins.decoder_fit`, or
      `after_training_settings`) and their name.
  Returns:
    `(params, stats)`: the whole model's params (host arrays) with the image decoder's
    Q-Former, `neg_prompt_embeds` and UNet (and, for "llm", `context_feat_proj`) fitted in
    float32, and the fit's last error.
  """
  trained, error = fit_image_decoder(config, params, rng, settings, where, log, record,
                                    check_stop)
  kept = {name: trained[name] for name in ("image_decoder", "context_feat_proj")
          if name in trained}
  return dict(params, **jax.device_get(kept)), {"decoder_fit_error": error}


__all__ = ["CONTEXTS", "after_training_settings", "caption_contexts", "check_settings",
           "fit_decoder", "fit_image_decoder", "forward_order", "merge_fitted", "split_fitted",
           "training_pairs"]
