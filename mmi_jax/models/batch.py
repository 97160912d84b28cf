"""The model's input: a static-shape batch of token rows and a flat list of image slots.

A batch holds `B` token sequences of `L` tokens and a flat list of `N` image slots, in
document order (all images of a sequence in the order of its soi tokens; sequences may
interleave in the list). Padding slots (`image_valid` False) hold any pixels and change
nothing. One compilation serves every batch of the same shapes.

`MMInterleaved` reads it; the data pipeline builds it (`mmi_jax.data.packing`) and checks it on
the host before it reaches the device (`mmi_jax.batch.validate`).
"""

from __future__ import annotations

import flax.struct
import jax


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


__all__ = ["Batch"]
