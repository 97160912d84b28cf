"""Documents -> token ids -> a static-shape `mmi_jax.models.batch.Batch` (SPEC 2).

A document's ids are `<s>`, its words, each image as soi + `tokens_per_image` `<|image|>` ids
at its place, and `</s>`. `pack_rows` puts whole documents into rows of `sequence_length`
tokens, several per row when they fit, and never cuts a document (so never an image's tokens)
apart; a document that cannot be placed is skipped and counted, never raised on.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from mmi_jax import batch as batch_lib
from mmi_jax.data import shapes
from mmi_jax.data.tokenizer import ShapesTokenizer
from mmi_jax.models.batch import Batch
from mmi_jax.models.multimodal_inputs import TokenIds

# Why `pack_rows` skips a document.
SKIP_REASONS = (
    "longer_than_row",  # more tokens than a row holds
    "too_many_images",  # more images than a row's image slots
    "row_full",  # not enough room left in its row (`documents_per_row` given)
    "no_room",  # no row had room left
)


def document_tokens(document: shapes.Document, tokenizer: ShapesTokenizer, tokens: TokenIds
                    ) -> tuple[list[int], list[shapes.Scene]]:
  """The document's token ids and its images in the order of their soi tokens."""
  ids, images = [tokens.bos], []
  for segment in document.segments:
    if isinstance(segment, shapes.Scene):
      ids += [tokens.soi] + [tokens.image] * tokens.tokens_per_image
      images.append(segment)
    else:
      ids += tokenizer.encode(segment)
  ids.append(tokens.eos)
  return ids, images


def pack_rows(documents: Sequence[shapes.Document], *, rows: int, sequence_length: int,
              images_per_row: int, model_config: Any, tokenizer: ShapesTokenizer,
              documents_per_row: int | None = None
              ) -> tuple[Batch, dict[str, Any]]:
  """Packs documents, in order, into a NumPy `Batch` of `rows` rows; checks it with `validate`.

  Args:
    documents: the documents, in the order they fill the rows.
    rows: B, rows of the batch.
    sequence_length: L, tokens per row (right-padded with `pad_id`, attention mask 0).
    images_per_row: image slots per row; the batch has `N = rows * images_per_row` slots, row
      r's images in slots `r * images_per_row ...` in order, the rest padding (zero pixels,
      row 0, `image_valid` False).
    model_config: `config.model` (token ids, `vision_encoder.image_size`, and
      `image_decoder.image_size` when the model has an image decoder).
    tokenizer: the dataset's tokenizer (`shapes_tokenizer()`).
    documents_per_row: None: greedy, each document goes into the first row, from the current
      one on, with room for it. An int D: document i may only go into row `i // D` (at most
      `rows * D` documents), so each row depends on its own documents only.

  Returns:
    `(batch, stats)`: the batch (`text_ids`, `attention_mask` `[B, L]` int32; `images`
    `[N, Hv, Wv, 3]` and `decoder_images` `[N, Hd, Wd, 3]` float32 in [0, 1] (None without an
    image decoder); `image_sequence_ids` `[N]` int32; `image_valid` `[N]` bool; the other
    fields None) and a dict: `documents` (given), `packed`, `skipped`, `reasons`
    (`SKIP_REASONS` -> count), `tokens` (real tokens) and `images` (valid slots).
  """
  tokens = TokenIds.from_config(model_config)
  tokenizer.check_compatible(model_config.tokens)
  if documents_per_row is not None and len(documents) > rows * documents_per_row:
    raise ValueError(f"{len(documents)} documents for {rows} rows of {documents_per_row}")
  row_ids = [[] for _ in range(rows)]
  row_images = [[] for _ in range(rows)]
  reasons = collections.Counter({reason: 0 for reason in SKIP_REASONS})

  def fits(row, ids, images):
    return (len(row_ids[row]) + len(ids) <= sequence_length
            and len(row_images[row]) + len(images) <= images_per_row)

  current = 0
  for position, document in enumerate(documents):
    ids, images = document_tokens(document, tokenizer, tokens)
    if len(ids) > sequence_length:
      reasons["longer_than_row"] += 1
      continue
    if len(images) > images_per_row:
      reasons["too_many_images"] += 1
      continue
    if documents_per_row is not None:
      row = position // documents_per_row
      if not fits(row, ids, images):
        reasons["row_full"] += 1
        continue
    else:
      row = next((r for r in range(current, rows) if fits(r, ids, images)), None)
      if row is None:
        reasons["no_room"] += 1
        continue
      current = row
    row_ids[row] += ids
    row_images[row] += images

  text_ids = np.full((rows, sequence_length), tokens.pad, np.int32)
  attention_mask = np.zeros((rows, sequence_length), np.int32)
  num_slots = rows * images_per_row
  image_sequence_ids = np.zeros((num_slots,), np.int32)
  image_valid = np.zeros((num_slots,), bool)
  vision_size = model_config.vision_encoder.image_size
  images = np.zeros((num_slots, vision_size, vision_size, 3), np.float32)
  decoder = model_config.get("image_decoder")
  decoder_images = None
  if decoder is not None:
    decoder_images = np.zeros((num_slots, decoder.image_size, decoder.image_size, 3), np.float32)
  for row in range(rows):
    text_ids[row, :len(row_ids[row])] = row_ids[row]
    attention_mask[row, :len(row_ids[row])] = 1
    for rank, scene in enumerate(row_images[row]):
      slot = row * images_per_row + rank
      image_sequence_ids[slot] = row
      image_valid[slot] = True
      images[slot] = shapes.render(scene, vision_size) / np.float32(255)
      if decoder_images is not None:
        decoder_images[slot] = shapes.render(scene, decoder.image_size) / np.float32(255)

  batch = Batch(text_ids=text_ids, attention_mask=attention_mask, images=images,
                          image_sequence_ids=image_sequence_ids, image_valid=image_valid,
                          decoder_images=decoder_images)
  batch_lib.validate(batch, model_config, max_images_per_sequence=images_per_row)
  skipped = sum(reasons.values())
  stats = dict(documents=len(documents), packed=len(documents) - skipped, skipped=skipped,
               reasons=dict(reasons), tokens=int(attention_mask.sum()),
               images=int(image_valid.sum()))
  return batch, stats


__all__ = ["SKIP_REASONS", "document_tokens", "pack_rows"]
