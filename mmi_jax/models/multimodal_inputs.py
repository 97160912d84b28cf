"""Where the images go in the LLM's input, and which images each token may sample (SPEC 5).

Everything is computed from token ids with fixed-size array ops, so one compilation serves
every batch of a shape:

  * `images_per_sequence`: a flat list of images (each tagged with its sequence) -> per-sequence
    slots `[B, N_max, ...]` and the slot mask.
  * `scan_documents`: for a chunk of tokens, the nearest `<s>` at or before each token and the
    slot of each image's first `<|image|>` token (soi slot + 1, as the release counts it).
    The n-th soi of a sequence starts image slot n.
  * `image_visibility`: image n is visible to token t iff `nearest_bos[t] < start_n <= t`.
  * `place_image_embeddings`: the k-th `<|image|>` token of a sequence takes embedding
    `k % T` of image `k // T` (T tokens per image); `add_soi_embedding` adds the learned
    `soi_token` at every soi.

The chunk functions take a `DocumentState`, which carries what earlier chunks showed (last
`<s>`, image starts, counts, next position), so that cached decoding computes exactly what one
pass over the whole sequence computes. A full forward is one chunk from `DocumentState.empty`.

Positions here are slots of the token axis (of the KV cache when decoding); padding tokens
(attention mask 0) occupy slots but never count as `<s>`, soi or image tokens, and do not
advance the RoPE position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special ids of SPEC section 2 and the number of `<|image|>` tokens per image."""

  bos: int = 1
  eos: int = 2
  pad: int = 31999
  soi: int = 32000
  image: int = 32001
  tokens_per_image: int = 64

  @classmethod
  def from_config(cls, model_config: Any) -> "TokenIds":
    """From a model config (`config.model`): its `tokens` section."""
    tokens = model_config.tokens
    return cls(bos=tokens.bos_id, eos=tokens.eos_id, pad=tokens.pad_id, soi=tokens.soi_id,
               image=tokens.image_id, tokens_per_image=tokens.tokens_per_image)


@flax.struct.dataclass
class DocumentState:
  """What the tokens before a chunk showed, per sequence.

  Attributes:
    last_bos: `[B]` slot of the last `<s>` so far (-1: none).
    image_starts: `[B, N]` slot of each image's first `<|image|>` token (-1: not yet seen).
    soi_count: `[B]` soi tokens so far (= images started).
    image_tokens: `[B]` `<|image|>` tokens so far.
    next_position: `[B]` RoPE position of the next real token.
  """

  last_bos: jax.Array
  image_starts: jax.Array
  soi_count: jax.Array
  image_tokens: jax.Array
  next_position: jax.Array

  @classmethod
  def empty(cls, batch: int, max_images: int) -> "DocumentState":
    zeros = jnp.zeros((batch,), jnp.int32)
    return cls(last_bos=zeros - 1, image_starts=jnp.full((batch, max_images), -1, jnp.int32),
               soi_count=zeros, image_tokens=zeros, next_position=zeros)


def images_per_sequence(images: jax.Array, sequence_ids: jax.Array, image_valid: jax.Array,
                        batch: int, max_images: int) -> tuple[jax.Array, jax.Array]:
  """Scatters a flat list of images into per-sequence slots, keeping their order.

  Args:
    images: `[I, ...]` per-image arrays (features, embeddings), in document order.
    sequence_ids: `[I]` int, the sequence (row) each image belongs to.
    image_valid: `[I]` bool, False for padding entries of the list.
    batch, max_images: B and N of the result.
  Returns:
    `([B, N, ...], slot_mask [B, N])`: image i lands in row `sequence_ids[i]`, slot = number of
    valid images before it in that row. Images beyond N slots are dropped (check the layout
    on the host with `check_image_layout`).
  """
  slot = image_slots(sequence_ids, image_valid, batch)
  keep = image_valid.astype(bool) & (slot < max_images) & (sequence_ids >= 0) & (
      sequence_ids < batch)
  flat_index = jnp.where(keep, sequence_ids * max_images + slot, batch * max_images)
  out = jnp.zeros((batch * max_images,) + images.shape[1:], images.dtype)
  out = out.at[flat_index].set(images, mode="drop")
  slot_mask = jnp.zeros((batch * max_images,), bool).at[flat_index].set(True, mode="drop")
  return (out.reshape((batch, max_images) + images.shape[1:]),
          slot_mask.reshape(batch, max_images))


def image_slots(sequence_ids: jax.Array, image_valid: jax.Array, batch: int) -> jax.Array:
  """`[I]` the slot of each image of a flat list in its sequence: the number of valid images
  of the same sequence before it (the image's rank, = which soi of the row starts it)."""
  valid = image_valid.astype(bool)
  one_hot = (sequence_ids[:, None] == jnp.arange(batch)[None, :]) & valid[:, None]  # [I, B]
  rank = jnp.cumsum(one_hot, axis=0, dtype=jnp.int32) - 1
  return jnp.take_along_axis(rank, jnp.clip(sequence_ids, 0, batch - 1)[:, None], axis=1)[:, 0]


def scan_documents(token_ids: jax.Array, valid: jax.Array, first_slot: jax.Array | int,
                   state: DocumentState, tokens: TokenIds
                   ) -> tuple[jax.Array, jax.Array, DocumentState]:
  """Nearest `<s>`, RoPE positions and image starts for a chunk of tokens.

  Args:
    token_ids: `[B, L]`.
    valid: `[B, L]`, the attention mask (padding never counts).
    first_slot: slot of the chunk's first token (0 for a full sequence).
    state: what earlier chunks showed (`DocumentState.empty` for none).
    tokens: the special ids.
  Returns:
    `(nearest_bos [B, L], positions [B, L], new state)`; `nearest_bos[t]` is the slot of the
    last `<s>` at or before t (-1 if none); positions count real tokens from the state's
    `next_position` (padding repeats its neighbour's position).
  """
  valid = valid.astype(bool)
  slots = first_slot + jnp.arange(token_ids.shape[1], dtype=jnp.int32)[None, :]
  is_bos = (token_ids == tokens.bos) & valid
  bos_slots = jax.lax.cummax(jnp.where(is_bos, slots, -1), axis=1)
  nearest_bos = jnp.maximum(bos_slots, state.last_bos[:, None])

  counted = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  positions = jnp.maximum(state.next_position[:, None] + counted - 1, 0)

  is_soi = (token_ids == tokens.soi) & valid
  image_index = state.soi_count[:, None] + jnp.cumsum(is_soi.astype(jnp.int32), axis=1) - 1
  max_images = state.image_starts.shape[1]
  rows = jnp.broadcast_to(jnp.arange(token_ids.shape[0])[:, None], token_ids.shape)
  target = jnp.where(is_soi & (image_index < max_images), image_index, max_images)
  image_starts = state.image_starts.at[rows, target].set(
      jnp.broadcast_to(slots + 1, token_ids.shape), mode="drop")

  is_image = (token_ids == tokens.image) & valid
  new_state = DocumentState(
      last_bos=nearest_bos[:, -1], image_starts=image_starts,
      soi_count=state.soi_count + jnp.sum(is_soi, axis=1, dtype=jnp.int32),
      image_tokens=state.image_tokens + jnp.sum(is_image, axis=1, dtype=jnp.int32),
      next_position=state.next_position + counted[:, -1])
  return nearest_bos, positions, new_state


def image_visibility(nearest_bos: jax.Array, query_slots: jax.Array, image_starts: jax.Array,
                     slot_mask: jax.Array | None = None) -> jax.Array:
  """The cross-attention mask `[B, L, N]` of SPEC section 5.

  Image n is visible to the token at slot t iff it has started (`start_n >= 0`), holds an image
  (`slot_mask`), and `nearest_bos[t] < start_n <= t`: images of the token's own document up
  to the token itself.

  Args:
    nearest_bos: `[B, L]`.
    query_slots: `[L]` or `[B, L]` slots of the tokens.
    image_starts: `[B, N]` (`DocumentState.image_starts`).
    slot_mask: optional `[B, N]`.
  """
  starts = image_starts[:, None, :]
  slots = jnp.broadcast_to(query_slots, nearest_bos.shape)[:, :, None]
  visible = (starts >= 0) & (starts > nearest_bos[:, :, None]) & (starts <= slots)
  if slot_mask is not None:
    visible = visible & slot_mask.astype(bool)[:, None, :]
  return visible


def place_image_embeddings(token_embeds: jax.Array, token_ids: jax.Array, valid: jax.Array,
                           image_embeds: jax.Array, image_tokens_before: jax.Array,
                           image_id: int) -> jax.Array:
  """Replaces each `<|image|>` token's embedding by its image's embeddings, in order.

  Args:
    token_embeds: `[B, L, D]`.
    token_ids, valid: `[B, L]`.
    image_embeds: `[B, N, T, D]` per-sequence image embeddings (T per image).
    image_tokens_before: `[B]` `<|image|>` tokens in earlier chunks (`DocumentState`).
    image_id: the `<|image|>` id.
  Returns:
    `[B, L, D]`.
  """
  batch, num_images, per_image, _ = image_embeds.shape
  is_image = (token_ids == image_id) & valid.astype(bool)
  index = image_tokens_before[:, None] + jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
  index = jnp.clip(index, 0, num_images * per_image - 1)
  flat = image_embeds.reshape(batch, num_images * per_image, -1)
  gathered = jnp.take_along_axis(flat, index[:, :, None], axis=1)
  return jnp.where(is_image[:, :, None], gathered.astype(token_embeds.dtype), token_embeds)


def add_soi_embedding(embeds: jax.Array, token_ids: jax.Array, valid: jax.Array,
                      soi_embedding: jax.Array, soi_id: int) -> jax.Array:
  """Adds the learned `soi_token` (`[D]` or `[1, D]`) at every soi position."""
  is_soi = (token_ids == soi_id) & valid.astype(bool)
  soi = soi_embedding.reshape(-1).astype(embeds.dtype)
  return embeds + jnp.where(is_soi[:, :, None], soi, jnp.zeros_like(soi))


def check_image_layout(token_ids: np.ndarray, attention_mask: np.ndarray,
                       images_per_row: np.ndarray, tokens: TokenIds,
                       max_images: int | None = None) -> None:
  """Host-side check that a batch's image tokens agree with its images; raises ValueError.

  Each row must have one soi per image, each followed by exactly `tokens_per_image`
  `<|image|>` tokens, and (if given) at most `max_images` images.
  """
  token_ids, attention_mask = np.asarray(token_ids), np.asarray(attention_mask).astype(bool)
  for row, (ids, mask, count) in enumerate(zip(token_ids, attention_mask, images_per_row)):
    ids = ids[mask]
    soi = np.flatnonzero(ids == tokens.soi)
    if len(soi) != count:
      raise ValueError(f"row {row}: {len(soi)} soi tokens but {count} images")
    if max_images is not None and count > max_images:
      raise ValueError(f"row {row}: {count} images, more than the {max_images} image slots")
    image_tokens = int(np.sum(ids == tokens.image))
    if image_tokens != count * tokens.tokens_per_image:
      raise ValueError(f"row {row}: {image_tokens} <|image|> tokens for {count} images of "
                       f"{tokens.tokens_per_image} tokens each")
    for start in soi:
      run = ids[start + 1:start + 1 + tokens.tokens_per_image]
      if len(run) != tokens.tokens_per_image or np.any(run != tokens.image):
        raise ValueError(f"row {row}: the soi at token {start} is not followed by "
                         f"{tokens.tokens_per_image} <|image|> tokens")


__all__ = ["DocumentState", "TokenIds", "add_soi_embedding", "check_image_layout",
           "image_slots", "image_visibility", "images_per_sequence", "place_image_embeddings",
           "scan_documents"]
