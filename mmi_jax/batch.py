"""The training batch of MM-Interleaved: static shapes, images as one flat list.

A batch holds `B` token sequences of `L` tokens and a flat list of `N` image slots, in
document order (all images of a sequence in the order of its soi tokens; sequences may
interleave in the list). Padding slots (`image_valid` False) hold any pixels and change
nothing. One compilation serves every batch of the same shapes.

Host-side `validate` checks what array ops cannot report: that each sequence has one soi
followed by `tokens_per_image` `<|image|>` tokens per image it owns, and that the shapes and
sizes agree with the model config. Run it in the data pipeline, before a batch reaches the
device.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np

from mmi_jax.models.multimodal_inputs import TokenIds, check_image_layout


@flax.struct.dataclass
class Batch:
  """One batch (a pytree; optional fields may be None).

  Attributes:
    text_ids: `[B, L]` int token ids.
    attention_mask: `[B, L]` int, 1 on real tokens.
    images: `[N, Hv, Wv, 3]` float pixels in [0, 1] at the vision encoder's size.
    image_sequence_ids: `[N]` int, the sequence (row of `text_ids`) each image belongs to.
    image_valid: `[N]` bool, False for padding slots.
    decoder_images: `[N, Hd, Wd, 3]` in [0, 1] at the image decoder's size; None: `images`
      (which must then have the decoder's size), as the release does.
    image_loss_mask: `[N]`, 0 excludes an image from the image loss; None: all count.
    prompt_offsets: `[B]` int, targets at positions before the offset carry no text loss
      (the release's `ignore_prompt_token_offset`); None: 0.
    ignore_noimage_text: `[B]` bool, rows of image-text-pair datasets: text with no image
      earlier in its document carries no text loss (`dataset_to_ignore_noimage_cond_loss`);
      None: False.
    context_starts: `[N]` int, where each image's context for the image decoder starts (the
      release's `nearest_bos_idxs`); None: its document's `<s>` (SPEC 7). The release's
      pair datasets pass none, which means 0 (the row's start): pass zeros to reproduce them.
  """

  text_ids: jax.Array
  attention_mask: jax.Array
  images: jax.Array
  image_sequence_ids: jax.Array
  image_valid: jax.Array
  decoder_images: jax.Array | None = None
  image_loss_mask: jax.Array | None = None
  prompt_offsets: jax.Array | None = None
  ignore_noimage_text: jax.Array | None = None
  context_starts: jax.Array | None = None

  @property
  def batch_size(self) -> int:
    return self.text_ids.shape[0]

  @property
  def num_image_slots(self) -> int:
    return self.images.shape[0]


def validate(batch: Batch, model_config: Any, *, max_images_per_sequence: int | None = None
             ) -> None:
  """Raises ValueError naming the first problem of a host-side (NumPy) batch.

  Checks shapes and dtypes against `model_config` (`config.model`), the images' layout in
  each sequence (`check_image_layout`), sequence ids in range, and context starts at or
  before their image's soi.
  """
  tokens = TokenIds.from_config(model_config.tokens)
  text_ids = np.asarray(batch.text_ids)
  if text_ids.ndim != 2 or not np.issubdtype(text_ids.dtype, np.integer):
    raise ValueError(f"batch.text_ids must be an int [B, L] array, got {text_ids.dtype} "
                     f"{text_ids.shape}")
  rows, length = text_ids.shape
  attention_mask = np.asarray(batch.attention_mask)
  if attention_mask.shape != text_ids.shape:
    raise ValueError(f"batch.attention_mask {attention_mask.shape} must have text_ids' shape "
                     f"{text_ids.shape}")
  if length > model_config.tokens.max_sequence_length:
    raise ValueError(f"batch.text_ids has {length} tokens per row, more than "
                     f"max_sequence_length {model_config.tokens.max_sequence_length}")
  num_slots = batch.images.shape[0]
  size = model_config.vision_encoder.image_size
  if tuple(batch.images.shape[1:]) != (size, size, 3):
    raise ValueError(f"batch.images must be [N, {size}, {size}, 3] (vision_encoder.image_size "
                     f"{size}), got {tuple(batch.images.shape)}")
  decoder = model_config.get("image_decoder")
  if decoder is not None:
    decoder_size = decoder.image_size
    decoder_images = batch.images if batch.decoder_images is None else batch.decoder_images
    if tuple(decoder_images.shape) != (num_slots, decoder_size, decoder_size, 3):
      which = "images" if batch.decoder_images is None else "decoder_images"
      raise ValueError(f"batch.{which} must be [{num_slots}, {decoder_size}, {decoder_size}, 3] "
                       f"for the image decoder (image_decoder.image_size {decoder_size}), got "
                       f"{tuple(decoder_images.shape)}")
  for name in ("image_sequence_ids", "image_valid", "image_loss_mask", "context_starts"):
    value = getattr(batch, name)
    if value is not None and np.shape(value) != (num_slots,):
      raise ValueError(f"batch.{name} must be [{num_slots}] (one per image slot), got "
                       f"{np.shape(value)}")
  for name in ("prompt_offsets", "ignore_noimage_text"):
    value = getattr(batch, name)
    if value is not None and np.shape(value) != (rows,):
      raise ValueError(f"batch.{name} must be [{rows}] (one per row), got {np.shape(value)}")

  valid = np.asarray(batch.image_valid).astype(bool)
  sequence_ids = np.asarray(batch.image_sequence_ids)
  bad = np.flatnonzero(valid & ((sequence_ids < 0) | (sequence_ids >= rows)))
  if bad.size:
    raise ValueError(f"batch.image_sequence_ids: image slot {bad[0]} names row "
                     f"{sequence_ids[bad[0]]}, outside [0, {rows})")
  per_row = np.bincount(sequence_ids[valid], minlength=rows)
  check_image_layout(text_ids, attention_mask, per_row, tokens, max_images_per_sequence)
  if batch.context_starts is not None:
    starts = np.asarray(batch.context_starts)
    for slot in np.flatnonzero(valid):
      row = sequence_ids[slot]
      rank = int(np.sum(valid[:slot] & (sequence_ids[:slot] == row)))
      soi = np.flatnonzero((text_ids[row] == tokens.soi) & attention_mask[row].astype(bool))
      if not 0 <= starts[slot] <= soi[rank]:
        raise ValueError(f"batch.context_starts: image slot {slot} starts its context at "
                         f"{starts[slot]}, not within [0, its soi at {soi[rank]}]")


__all__ = ["Batch", "validate"]
