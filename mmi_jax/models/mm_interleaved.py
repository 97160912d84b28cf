"""MM-Interleaved assembled: the training forward with both losses (SPEC 1, 5, 7, 8).

Mirrors `mm_interleaved/models/mm_interleaved.py::MMInterleaved.forward`:

  1. the visual tokenizer encodes every image slot: 64 LLM-width tokens per image and the
     adapter's multi-scale maps;
  2. the LLM (`MultimodalLM`: input assembly, Llama with MMFS, text head) reads the tokens, its
     MMFS layers sampling the maps of the sizes in `llm.mmfs.scale_sizes` of the images of each
     token's document up to the token;
  3. the text loss: next-token cross-entropy over the targets SPEC 8 keeps (`text_targets`);
  4. each image's context: the LLM's last hidden states from its context start (its document's
     `<s>`) to its soi, reversed (soi first), through `context_feat_proj`, plus a 1-D sin-cos
     table, padded to `max_context_length` with a mask;
  5. the image decoder's diffusion loss, its MMFS net sampling all maps of the *previous image
     of the same sequence* when that image lies within the context (`previous_image`);
  6. loss = text_weight * loss_txt + image_weight * loss_img.

Everything data-dependent is a fixed-size array op over the static batch (`mmi_jax.models.batch`).

Param names are the release's top-level modules: `visual_tokenizer`, `mm_decoder`,
`text_decoder`, `soi_token` (the three of `MultimodalLM`, which shares this module's scope),
`image_decoder`, `context_feat_proj`.

Where the release differs from SPEC, this follows the release: the image loss averages over
all images (those without loss count as zeros); contexts start at the `nearest_bos_idxs` the
data gives (the document's `<s>` for MMC4, the row's start for pair datasets, which pass
none: `Batch.context_starts`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.models import image_decoder as image_decoder_lib
from mmi_jax.models import multimodal_inputs as mm_inputs
from mmi_jax.models import visual_tokenizer as visual_tokenizer_lib
from mmi_jax.models.batch import Batch
from mmi_jax.models.image_decoder import ImageDecoder
from mmi_jax.models.linear import Linear
from mmi_jax.models.multimodal_lm import MultimodalLM
from mmi_jax.models.sincos import sincos_1d
from mmi_jax.models.visual_tokenizer import VisualTokenizer

IGNORE_INDEX = -100


@flax.struct.dataclass
class DiffusionInputs:
  """Explicit values for the image loss's random draws (each None: drawn from the rng).

  Attributes (N = image slots, latents `[N, h, w, c]`):
    latent_noise: the VAE sample's noise.
    noise: the diffusion noise.
    timesteps: int `[N]`.
    uncond_mask: bool `[N]`, True where the conditioning is replaced by `neg_prompt_embeds`.
  """

  latent_noise: jax.Array | None = None
  noise: jax.Array | None = None
  timesteps: jax.Array | None = None
  uncond_mask: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class AssemblyConfig:
  """How the parts are wired (from `config.model`).

  Attributes:
    tokens: the special ids.
    llm_scale_sizes: sides of the maps the LLM's MMFS samples (32, 16, 8).
    decoder_scale_sizes: sides of the maps the MMFS net samples (64, 32, 16, 8).
    max_context_length: static length of each image's context (tokens beyond it, the
      farthest from the soi, are dropped; the release's longest is the sequence length).
    context_pos_length: rows of the 1-D sin-cos table (the release's `seq_len`).
    text_weight, image_weight: the loss weights.
  """

  tokens: mm_inputs.TokenIds
  llm_scale_sizes: tuple[int, ...]
  decoder_scale_sizes: tuple[int, ...]
  max_context_length: int
  context_pos_length: int
  text_weight: float = 1.0
  image_weight: float = 10.0

  @classmethod
  def from_config(cls, model_config: Any) -> "AssemblyConfig":
    """From a model config (`config.model`)."""
    decoder = model_config.get("image_decoder")
    return cls(
        tokens=mm_inputs.TokenIds.from_config(model_config),
        llm_scale_sizes=tuple(model_config.llm.mmfs.scale_sizes),
        decoder_scale_sizes=() if decoder is None else tuple(decoder.mmfs.scale_sizes),
        max_context_length=0 if decoder is None else decoder.max_context_length,
        context_pos_length=0 if decoder is None else decoder.context_pos_length,
        text_weight=float(model_config.loss.text_weight),
        image_weight=float(model_config.loss.image_weight))


def select_maps(maps: tuple[jax.Array, ...], sizes: tuple[int, ...], consumer: str) -> jax.Array:
  """The maps `[N, h, w, E]` whose side is in `sizes` (in that order), flattened and
  concatenated: `[N, sum(h * w), E]`."""
  by_size = {m.shape[1]: m for m in maps}
  missing = [size for size in sizes if size not in by_size]
  if missing:
    raise ValueError(f"{consumer} samples maps of sizes {sizes}, but the vision encoder makes "
                     f"{tuple(by_size)}")
  return jnp.concatenate(
      [by_size[size].reshape(by_size[size].shape[0], -1, by_size[size].shape[-1])
       for size in sizes], axis=1)


def text_targets(text_ids: jax.Array, attention_mask: jax.Array, tokens: mm_inputs.TokenIds,
                 prompt_offsets: jax.Array | None = None,
                 ignore_noimage_text: jax.Array | None = None) -> jax.Array:
  """The next-token targets `[B, L - 1]` of SPEC 8 (`-100` where ignored), as the release's
  `_prepare_gt_text_ids`.

  Target `t` (the token at `t + 1`) is ignored if it is pad, `<|image|>` or `<s>`, has
  attention mask 0, is a soi right after `<s>`, lies before its row's prompt offset, or (rows
  with `ignore_noimage_text`) has no soi between its document's `<s>` and itself.
  """
  batch, length = text_ids.shape
  valid = attention_mask.astype(bool)
  positions = jnp.arange(length, dtype=jnp.int32)[None, :]
  targets = text_ids.astype(jnp.int32)
  ignore = jnp.zeros((batch, length), bool)
  if prompt_offsets is not None:
    ignore |= positions < prompt_offsets[:, None]
  if ignore_noimage_text is not None:
    is_bos = (text_ids == tokens.bos) & valid
    is_soi = (text_ids == tokens.soi) & valid
    nearest_bos = jnp.maximum(jax.lax.cummax(jnp.where(is_bos, positions, -1), axis=1), 0)
    nearest_soi = jax.lax.cummax(jnp.where(is_soi, positions, -1), axis=1)
    no_image = (nearest_soi < nearest_bos) | (nearest_soi == -1)
    ignore |= no_image & ignore_noimage_text.astype(bool)[:, None]
  following = text_ids[:, 1:]
  ignore = ignore[:, 1:]
  ignore |= (following == tokens.pad) | (following == tokens.image) | (following == tokens.bos)
  ignore |= ~valid[:, 1:]
  ignore |= (text_ids[:, :-1] == tokens.bos) & (following == tokens.soi)
  return jnp.where(ignore, IGNORE_INDEX, targets[:, 1:])


def text_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of `logits [B, L, V]` (positions `0 .. L-2`) against `targets
  [B, L-1]` over the targets that count; `(loss, count)`. No target: loss 0 (torch: NaN)."""
  logits = logits[:, :-1].astype(jnp.float32)
  counts = targets != IGNORE_INDEX
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(counts, targets, 0)[..., None], axis=-1)
  count = jnp.sum(counts)
  loss = -jnp.sum(jnp.where(counts, picked[..., 0], 0.0)) / jnp.maximum(count, 1)
  return loss, count


def image_soi_positions(text_ids: jax.Array, attention_mask: jax.Array, sequence_ids: jax.Array,
                        image_valid: jax.Array, soi_id: int) -> tuple[jax.Array, jax.Array]:
  """Where each image slot's soi is, and its rank in its sequence.

  Returns:
    `(soi_positions [N], ranks [N])`: the position of the `rank`-th soi of the image's row
    (-1 for padding slots or a missing soi).
  """
  batch, length = text_ids.shape
  ranks = mm_inputs.image_slots(sequence_ids, image_valid, batch)
  is_soi = (text_ids == soi_id) & attention_mask.astype(bool)
  soi_rank = jnp.where(is_soi, jnp.cumsum(is_soi, axis=1, dtype=jnp.int32) - 1, -1)  # [B, L]
  rows = jnp.clip(sequence_ids, 0, batch - 1)
  match = soi_rank[rows] == ranks[:, None]  # [N, L]
  found = jnp.any(match, axis=1) & image_valid.astype(bool)
  positions = jnp.argmax(match, axis=1).astype(jnp.int32)
  return jnp.where(found, positions, -1), ranks


def previous_image(sequence_ids: jax.Array, ranks: jax.Array, image_valid: jax.Array,
                   soi_positions: jax.Array, context_starts: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """The MMFS net's value source: the image just before each image in its sequence, if it lies
  within the image's context (its soi at or after the context start), as the release's
  `_prepare_mmfs_features_for_image_decoder`.

  Returns:
    `(index [N] into the image slots, visible [N] bool)`.
  """
  valid = image_valid.astype(bool)
  same_row = sequence_ids[:, None] == sequence_ids[None, :]
  is_previous = same_row & valid[None, :] & (ranks[None, :] == ranks[:, None] - 1)  # [N, N]
  has_previous = jnp.any(is_previous, axis=1) & valid
  index = jnp.argmax(is_previous, axis=1).astype(jnp.int32)
  visible = has_previous & (context_starts <= soi_positions[index])
  return index, visible


def image_contexts(hidden_states: jax.Array, sequence_ids: jax.Array, soi_positions: jax.Array,
                   context_starts: jax.Array, max_length: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Each image's context: hidden states from its soi back to its context start (reversed).

  Args:
    hidden_states: `[B, L, D]` the LLM's last hidden states.
    sequence_ids, soi_positions, context_starts: `[N]` (soi -1: no context).
  Returns:
    `(context [N, max_length, D] zero-padded, mask [N, max_length] int32)`.
  """
  offsets = jnp.arange(max_length, dtype=jnp.int32)[None, :]
  positions = soi_positions[:, None] - offsets  # soi first
  mask = (offsets <= (soi_positions - context_starts)[:, None]) & (soi_positions[:, None] >= 0)
  rows = jnp.clip(sequence_ids, 0, hidden_states.shape[0] - 1)
  gathered = hidden_states[rows[:, None], jnp.clip(positions, 0, hidden_states.shape[1] - 1)]
  return jnp.where(mask[..., None], gathered, 0).astype(hidden_states.dtype), mask.astype(
      jnp.int32)


class MMInterleaved(nn.Module):
  """The whole model; `__call__(batch)` is the training forward.

  Attributes:
    assembly: the wiring (`AssemblyConfig`).
    visual_tokenizer: the `VisualTokenizer`.
    language: the `MultimodalLM` (its params sit at this module's top level).
    image_decoder: the `ImageDecoder`, or None (no image loss, as the release without an
      `image_decoder_config`).
    image_slots: per-sequence image slots of the LLM's synchronizer (None: the batch's image
      slot count, which always suffices).
  """

  assembly: AssemblyConfig
  visual_tokenizer: VisualTokenizer
  language: MultimodalLM
  image_decoder: ImageDecoder | None = None
  image_slots: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @classmethod
  def from_config(cls, model_config: Any, *, dtype: Any = None,
                  param_dtype: Any = jnp.float32, precision: Any = None,
                  attention_implementation: str | None = None,
                  remat_policy: str | None = None, image_slots: int | None = None
                  ) -> "MMInterleaved":
    """Builds the model from `config.model` (`configs/mmi_13b.py`, `configs/tiny.py`)."""
    shared = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
    runtime = dict(attention_implementation=attention_implementation, remat_policy=remat_policy)
    visual_tokenizer = VisualTokenizer.from_config(model_config, **shared, **runtime)
    language = MultimodalLM.from_config(model_config, **shared, **runtime)
    decoder = None
    if model_config.get("image_decoder") is not None:
      decoder = ImageDecoder.from_config(model_config, **shared, **runtime)
    return cls(AssemblyConfig.from_config(model_config), visual_tokenizer, language, decoder,
               image_slots=image_slots, **shared)

  def setup(self):
    nn.share_scope(self, self.language)
    width = self.language.llm.hidden_size
    if self.image_decoder is not None:
      self.context_feat_proj = Linear(width, kernel_axes=("embed", "query_proj"),
                                      dtype=self.dtype, param_dtype=self.param_dtype,
                                      precision=self.precision)

  def __call__(self, batch: Batch, *, rng: jax.Array | None = None,
               diffusion: DiffusionInputs | None = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """The training forward.

    Args:
      batch: a `Batch` (validate it on the host with `mmi_jax.batch.validate`).
      rng: key for the image loss's draws not given in `diffusion`.
      diffusion: explicit noise, timesteps and conditioning dropout (`DiffusionInputs`).
      deterministic: False enables the visual tokenizer's Q-Former dropout (rng "dropout").

    Returns:
      `loss` = text_weight * `loss_txt` + image_weight * `loss_img`; `logits [B, L, V]` float32;
      `text_targets [B, L-1]` (-100 ignored); `num_text_targets`; `per_image_loss [N]` and
      `image_loss_weight [N]` (1 where an image counts).
    """
    assembly = self.assembly
    visual, language = self._read(batch, deterministic)
    logits = language["logits"]
    targets = text_targets(batch.text_ids, batch.attention_mask, assembly.tokens,
                           batch.prompt_offsets, batch.ignore_noimage_text)
    loss_txt, num_targets = text_loss(logits, targets)
    outputs = {"logits": logits, "text_targets": targets, "num_text_targets": num_targets,
               "loss_txt": loss_txt}

    if self.image_decoder is None:
      outputs.update(loss_img=jnp.zeros((), jnp.float32), loss=assembly.text_weight * loss_txt)
      return outputs

    inputs = self._decoder_inputs(batch, visual, language["hidden_states"])
    diffusion = diffusion or DiffusionInputs()
    decoder_images = batch.images if batch.decoder_images is None else batch.decoder_images
    if rng is None and self.is_initializing():
      rng = self.make_rng("params")
    image_outputs = self.image_decoder(
        decoder_images, inputs["context"], inputs["context_mask"], inputs["mmfs_features"],
        inputs["mmfs_mask"], batch.image_loss_mask, batch.image_valid.astype(bool), rng=rng,
        latent_noise=diffusion.latent_noise, noise=diffusion.noise,
        timesteps=diffusion.timesteps, uncond_mask=diffusion.uncond_mask)
    loss_img = image_outputs["loss"]
    outputs.update(loss_img=loss_img, per_image_loss=image_outputs["per_image_loss"],
                   image_loss_weight=image_outputs["loss_weight"],
                   loss=assembly.text_weight * loss_txt + assembly.image_weight * loss_img)
    return outputs

  def image_decoder_inputs(self, batch: Batch) -> dict[str, jax.Array]:
    """What the image decoder sees for each image slot, to generate the slot's image (its soi
    and everything before it must be in `batch`; the slot's own pixels are not used).

    Returns:
      `context [N, max_context_length, D]`, `context_mask [N, max_context_length]`,
      `mmfs_features [N, 1, S, E]` (the previous image's maps) and `mmfs_mask [N, 1]`.
    """
    visual, language = self._read(batch, True)
    return self._decoder_inputs(batch, visual, language["hidden_states"])

  def read_images(self, images: jax.Array, sequence_ids: jax.Array, image_valid: jax.Array,
                  num_sequences: int, *, slots: int | None = None, deterministic: bool = True
                  ) -> tuple[dict, jax.Array, jax.Array, jax.Array]:
    """Step 1: the visual tokenizer on every image slot, arranged per sequence for the LLM.

    Args:
      images: `[N, Hv, Wv, 3]` in [0, 1]; sequence_ids `[N]`; image_valid `[N]`.
      num_sequences: B, the rows the images belong to.
      slots: image slots per sequence (None: `image_slots`, else N).
    Returns:
      `(visual, image_embeds [B, slots, T, D], llm_features [B, slots, S, E],
      slot_mask [B, slots])`: the tokenizer's outputs per image slot and, per sequence, the
      LLM's image tokens and the maps its MMFS samples (`MultimodalLM`'s image inputs).
    """
    sequence_ids = sequence_ids.astype(jnp.int32)
    image_valid = image_valid.astype(bool)
    slots = slots or self.image_slots or images.shape[0]
    visual = self.visual_tokenizer(images, deterministic=deterministic)
    image_embeds, slot_mask = mm_inputs.images_per_sequence(
        visual["vis_embed"], sequence_ids, image_valid, num_sequences, slots)
    llm_features, _ = mm_inputs.images_per_sequence(
        select_maps(visual["multiscale_features"], self.assembly.llm_scale_sizes,
                    "the LLM's MMFS"), sequence_ids, image_valid, num_sequences, slots)
    return visual, image_embeds, llm_features, slot_mask

  def _read(self, batch: Batch, deterministic: bool) -> tuple[dict, dict]:
    """Steps 1-2: the visual tokenizer on every image slot, then the LLM."""
    visual, image_embeds, llm_features, slot_mask = self.read_images(
        batch.images, batch.image_sequence_ids, batch.image_valid, batch.text_ids.shape[0],
        deterministic=deterministic)
    language = self.language(batch.text_ids, batch.attention_mask, image_embeds, llm_features,
                             slot_mask)
    return visual, language

  def decoder_contexts(self, hidden_states: jax.Array, sequence_ids: jax.Array,
                       soi_positions: jax.Array, context_starts: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Step 4: each image's context for the image decoder, from the LLM's last hidden states:
    the states from its soi back to its context start (soi first, `image_contexts`), through
    `context_feat_proj`, plus the 1-D sin-cos table.

    Args:
      hidden_states: `[B, L, D]`; sequence_ids, soi_positions, context_starts: `[N]`.
    Returns:
      `(context [N, max_context_length, D], mask [N, max_context_length])`.
    """
    assembly = self.assembly
    if assembly.max_context_length > assembly.context_pos_length:
      raise ValueError(f"max_context_length {assembly.max_context_length} exceeds the "
                       f"{assembly.context_pos_length} rows of the context position table")
    context, context_mask = image_contexts(hidden_states, sequence_ids, soi_positions,
                                           context_starts, assembly.max_context_length)
    table = sincos_1d(context.shape[-1], np.arange(assembly.max_context_length))
    return self.context_feat_proj(context) + jnp.asarray(table, context.dtype), context_mask

  def _decoder_inputs(self, batch: Batch, visual: dict, hidden_states: jax.Array
                      ) -> dict[str, jax.Array]:
    """Steps 4-5: each image's context and its previous image's maps."""
    assembly = self.assembly
    text_ids, attention_mask = batch.text_ids, batch.attention_mask
    num_sequences = text_ids.shape[0]
    sequence_ids = batch.image_sequence_ids.astype(jnp.int32)
    image_valid = batch.image_valid.astype(bool)
    soi_positions, ranks = image_soi_positions(text_ids, attention_mask, sequence_ids,
                                               image_valid, assembly.tokens.soi)
    if batch.context_starts is None:
      nearest_bos, _, _ = mm_inputs.scan_documents(
          text_ids, attention_mask, 0, mm_inputs.DocumentState.empty(num_sequences, 1),
          assembly.tokens)
      rows = jnp.clip(sequence_ids, 0, num_sequences - 1)
      context_starts = jnp.maximum(nearest_bos[rows, jnp.maximum(soi_positions, 0)], 0)
    else:
      context_starts = batch.context_starts.astype(jnp.int32)
    context, context_mask = self.decoder_contexts(hidden_states, sequence_ids, soi_positions,
                                                  context_starts)
    previous, visible = previous_image(sequence_ids, ranks, image_valid, soi_positions,
                                       context_starts)
    decoder_features = select_maps(visual["multiscale_features"], assembly.decoder_scale_sizes,
                                   "the MMFS net")
    return {"context": context, "context_mask": context_mask,
            "mmfs_features": decoder_features[previous][:, None], "mmfs_mask": visible[:, None]}


def frozen_param_patterns(model_config: Any) -> tuple[str, ...]:
  """Path patterns ('/'-joined) of the params the release does not train (SPEC 9): the CLIP
  ViT trunk (when `vision_encoder.frozen`) and `pos_embed` of the visual tokenizer, the LLM
  except its MMFS layers, the text head's `head`, the VAE and the MMFS net's fixed tables."""
  vision = visual_tokenizer_lib.frozen_param_patterns(
      freeze_vit=bool(model_config.vision_encoder.frozen))
  decoder = image_decoder_lib.FROZEN_PATTERNS
  return (tuple(r"^visual_tokenizer/" + pattern.lstrip("^") for pattern in vision)
          + (r"^mm_decoder/(?!layers_\d+/llama_cross_attn/)", r"^text_decoder/head/")
          + tuple(r"^image_decoder/" + pattern.lstrip("^") for pattern in decoder))


__all__ = ["AssemblyConfig", "DiffusionInputs", "IGNORE_INDEX", "MMInterleaved",
           "frozen_param_patterns", "image_contexts",
           "image_soi_positions", "previous_image", "select_maps", "text_loss", "text_targets"]
