"""Host-side checks of the model's batches, and shape-only example batches.

`validate` checks what array ops cannot report: that each sequence has one soi followed by
`tokens_per_image` `<|image|>` tokens per image it owns, and that the shapes and sizes agree
with the model config. Run it in the data pipeline, before a batch reaches the device.
`example_batch` gives the shape structs `init` and `jax.eval_shape` need.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.models.batch import Batch
from mmi_jax.models.multimodal_inputs import TokenIds, check_image_layout


def validate(batch: Batch, model_config: Any, *, max_images_per_sequence: int | None = None
             ) -> None:
  """Raises ValueError naming the first problem of a host-side (NumPy) batch.

  Checks shapes and dtypes against `model_config` (`config.model`), the images' layout in
  each sequence (`check_image_layout`), sequence ids in range, and context starts at or
  before their image's soi.
  """
  tokens = TokenIds.from_config(model_config)
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


def example_batch(model_config: Any, *, batch_size: int = 1, length: int = 8,
                  image_slots: int = 1) -> Batch:
  """Shape-only inputs for `init` / `jax.eval_shape` (`jax.ShapeDtypeStruct` leaves)."""
  size = model_config.vision_encoder.image_size
  decoder = model_config.get("image_decoder")
  struct = jax.ShapeDtypeStruct
  decoder_images = None
  if decoder is not None and decoder.image_size != size:
    decoder_images = struct((image_slots, decoder.image_size, decoder.image_size, 3),
                            jnp.float32)
  return Batch(text_ids=struct((batch_size, length), jnp.int32),
               attention_mask=struct((batch_size, length), jnp.int32),
               images=struct((image_slots, size, size, 3), jnp.float32),
               image_sequence_ids=struct((image_slots,), jnp.int32),
               image_valid=struct((image_slots,), jnp.bool_), decoder_images=decoder_images)


__all__ = ["example_batch", "validate"]
