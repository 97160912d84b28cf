"""The language side of MM-Interleaved: input assembly, Llama with MMFS, and the text head.

`MultimodalLM` holds the release's `mm_decoder` (the LLM), `text_decoder` (the text head) and
`soi_token`, under those names. One call runs a chunk of tokens:

  1. token embeddings, with each `<|image|>` position replaced by its image's embedding (in
     order) and `soi_token` added at each soi (`multimodal_inputs`);
  2. the LLM, whose MMFS layers sample, for each token, the images of its document up to the
     token (`image_visibility`), on per-sequence image features `[B, N, S, value_dim]`;
  3. the text head.

Without a `DecodeState` the chunk is the whole sequence. With one (`start_decoding`), the
chunk's keys and values go into the KV cache, the document bookkeeping carries on from the
earlier chunks, and the MMFS layers reuse the image features projected once by
`start_decoding`, so the synchronizer stays active for every new token (the release drops it
during cached generation).

RoPE positions count real tokens (`cumsum(attention_mask) - 1`), so padding on either side
changes nothing for the other tokens. For unpadded and right-padded rows this is the
release's `0 .. L-1`.

Images live in a static number of per-sequence slots; `slot_mask` says which hold an image, and
a slot without one is never visible. Padding slots change no result (see `MMFS.attend`'s
ignore slots), so a batch padded to any slot count computes what the release computes with its
per-batch image count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmi_jax.models import multimodal_inputs as mm_inputs
from mmi_jax.models.llama import KVCache, LlamaConfig, LlamaModel
from mmi_jax.models.multimodal_inputs import DocumentState, TokenIds
from mmi_jax.models.text_head import TextHead


@flax.struct.dataclass
class DecodeState:
  """Everything cached decoding carries between calls.

  Attributes:
    kv: the LLM's KV cache.
    documents: nearest `<s>`, image starts and counts so far.
    image_embeds: `[B, N, T, D]` the embeddings `<|image|>` tokens take (None: no images).
    projected_values: per MMFS layer, the images' normalized and projected features
      `[B, N, S, heads, head_dim]` (None: decoding without the synchronizer).
    slot_mask: `[B, N]` which image slots hold an image.
  """

  kv: KVCache
  documents: DocumentState
  image_embeds: jax.Array | None
  projected_values: tuple[jax.Array, ...] | None
  slot_mask: jax.Array


@dataclasses.dataclass(frozen=True)
class TextHeadConfig:
  text_vocab_size: int = 32000
  new_token_bias: float = -100.0
  head_new_bias: float = 95.0


class MultimodalLM(nn.Module):
  """Input assembly + `mm_decoder` (Llama with MMFS) + `text_decoder` (text head).

  Attributes:
    llm: the LLM's config (with `mmfs`).
    tokens: special ids and tokens per image.
    text_head: the text head's settings.
    attention_implementation, remat_policy: see `LlamaModel`.
  """

  llm: LlamaConfig
  tokens: TokenIds = TokenIds()
  text_head: TextHeadConfig = TextHeadConfig()
  attention_implementation: str | None = None
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @classmethod
  def from_config(cls, model_config: Any, **attributes) -> "MultimodalLM":
    """From an mmi_jax model config (`config.model`)."""
    tokens = model_config.tokens
    head = model_config.text_head
    return cls(llm=LlamaConfig.from_config(model_config), tokens=TokenIds.from_config(model_config),
               text_head=TextHeadConfig(text_vocab_size=tokens.text_vocab_size,
                                        new_token_bias=head.new_token_bias,
                                        head_new_bias=head.head_new_bias), **attributes)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.mm_decoder = LlamaModel(self.llm, self.attention_implementation, self.remat_policy,
                                 **kw)
    self.text_decoder = TextHead(self.llm.vocab_size, self.text_head.text_vocab_size,
                                 self.text_head.new_token_bias, self.text_head.head_new_bias,
                                 **kw)
    self.soi_token = self.param("soi_token", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, "embed")), (1, self.llm.hidden_size), self.param_dtype)

  def start_decoding(self, batch: int, max_length: int, image_embeds: jax.Array | None = None,
                     image_features: jax.Array | None = None,
                     slot_mask: jax.Array | None = None,
                     cache_dtype: Any = None) -> DecodeState:
    """An empty `DecodeState` for `max_length` token slots, with the images projected once.

    Args:
      batch, max_length: rows and token slots of the cache (prompt + new tokens).
      image_embeds: `[B, N, T, D]` per-sequence image embeddings, or None.
      image_features: `[B, N, S, value_dim]` per-sequence image features, or None (the
        synchronizer is then skipped).
      slot_mask: `[B, N]` which slots hold an image (None: all).
      cache_dtype: dtype of the cached keys and values (None: the computation dtype).
    """
    dtype = cache_dtype or self.dtype or self.param_dtype
    kv = KVCache.empty(self.llm, batch, max_length, dtype)
    images = [x for x in (image_embeds, image_features) if x is not None]
    num_images = images[0].shape[1] if images else 1
    if slot_mask is None:
      slot_mask = jnp.full((batch, num_images), bool(images))
    projected_values = None
    if image_features is not None:
      projected_values = self.mm_decoder.project_image_features(image_features)
    return DecodeState(kv=kv, documents=DocumentState.empty(batch, num_images),
                       image_embeds=image_embeds, projected_values=projected_values,
                       slot_mask=slot_mask.astype(bool))

  def set_image(self, state: DecodeState, slot: int | jax.Array, image_embeds: jax.Array,
                image_features: jax.Array | None = None) -> DecodeState:
    """Puts an image (e.g. one just generated) into slot `slot` of every row of `state`.

    Tokens already in the cache keep what they computed, which equals recomputing them with
    the image present: they cannot see an image whose soi comes after them.

    Args:
      image_embeds: `[B, T, D]`, what the slot's `<|image|>` tokens will take.
      image_features: `[B, S, value_dim]`, projected here for the MMFS layers (needs a state
        started with image features).
    """
    embeds = state.image_embeds.at[:, slot].set(image_embeds.astype(state.image_embeds.dtype))
    projected = state.projected_values
    if image_features is not None:
      if projected is None:
        raise ValueError("set_image: the state was started without image features")
      new = self.mm_decoder.project_image_features(image_features[:, None])
      projected = tuple(p.at[:, slot].set(n[:, 0].astype(p.dtype))
                        for p, n in zip(projected, new))
    return state.replace(image_embeds=embeds, projected_values=projected,
                         slot_mask=state.slot_mask.at[:, slot].set(True))

  def __call__(self, token_ids: jax.Array, attention_mask: jax.Array | None = None,
               image_embeds: jax.Array | None = None,
               image_features: jax.Array | None = None, slot_mask: jax.Array | None = None,
               state: DecodeState | None = None) -> dict[str, Any]:
    """Runs a chunk of tokens (the whole sequence when `state` is None).

    Args:
      token_ids: `[B, L]`.
      attention_mask: `[B, L]`, 1 for real tokens (None: all ones).
      image_embeds: `[B, N, T, D]` per-sequence image embeddings for the `<|image|>` tokens
        (None: the tokens keep their own embeddings).
      image_features: `[B, N, S, value_dim]` per-sequence image features for the MMFS layers
        (None skips the synchronizer: text-only).
      slot_mask: `[B, N]`, which slots hold an image (None: all).
      With a `state`, these three come from it (`start_decoding`, `set_image`) and must be
      None here.
      state: None, or the `DecodeState` to continue.
    Returns:
      `{"logits": [B, L, vocab] float32, "hidden_states": [B, L, D], "state": new state or
      None}`.
    """
    batch, length = token_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    valid = attention_mask.astype(bool)
    if state is None:
      num_images = 1 if image_features is None else image_features.shape[1]
      documents, first_slot = DocumentState.empty(batch, num_images), 0
      projected_values = None
      if image_features is not None:
        slot_mask = (jnp.ones((batch, num_images), bool) if slot_mask is None
                     else slot_mask.astype(bool))
        projected_values = self.mm_decoder.project_image_features(image_features)
    else:
      if image_embeds is not None or image_features is not None or slot_mask is not None:
        raise ValueError("MultimodalLM: with a DecodeState the images come from the state; "
                         "pass them to start_decoding (or set_image)")
      documents, first_slot = state.documents, state.kv.length
      image_embeds = state.image_embeds
      projected_values, slot_mask = state.projected_values, state.slot_mask

    nearest_bos, positions, documents_after = mm_inputs.scan_documents(
        token_ids, valid, first_slot, documents, self.tokens)
    embeds = self.mm_decoder.embed(token_ids)
    if image_embeds is not None:
      embeds = mm_inputs.place_image_embeddings(embeds, token_ids, valid, image_embeds,
                                                documents.image_tokens, self.tokens.image)
    embeds = mm_inputs.add_soi_embedding(embeds, token_ids, valid, self.soi_token,
                                         self.tokens.soi)
    image_mask = None
    if projected_values is not None:
      query_slots = first_slot + jnp.arange(length, dtype=jnp.int32)
      image_mask = mm_inputs.image_visibility(nearest_bos, query_slots,
                                              documents_after.image_starts, slot_mask)
    hidden_states, kv = self.mm_decoder(
        embeds, attention_mask, positions, projected_values=projected_values,
        image_mask=image_mask, cache=None if state is None else state.kv)
    logits = self.text_decoder(hidden_states)
    new_state = None
    if state is not None:
      new_state = state.replace(kv=kv, documents=documents_after)
    return {"logits": logits, "hidden_states": hidden_states, "state": new_state}


__all__ = ["DecodeState", "MultimodalLM", "TextHeadConfig"]
