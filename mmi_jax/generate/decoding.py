"""Cached greedy decoding of `MultimodalLM`: one prefill, then one token per step, in one jit.

The prompt may be padded on either side (`attention_mask` 0 on padding). New tokens of every
row go into the same cache slot each step; a right-padded row's padding slots stay masked, and
RoPE positions count only real tokens, so each row decodes as it would alone.

Sampling strategies of SPEC section 10 (nucleus sampling, repetition penalty, stopping on
`</s>` or soi) belong to interleaved inference and build on `decode_step` here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mmi_jax.models.multimodal_lm import DecodeState, MultimodalLM


def last_real_token_logits(logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """`[B, L, V]` -> `[B, V]`: each row's logits at its last real token."""
  slots = jnp.arange(attention_mask.shape[1])
  last = jnp.max(jnp.where(attention_mask.astype(bool), slots, 0), axis=1)
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("module", "max_length"))
def prefill(module: MultimodalLM, params: Any, token_ids: jax.Array, attention_mask: jax.Array,
            image_embeds: jax.Array | None, image_features: jax.Array | None,
            slot_mask: jax.Array | None, max_length: int) -> tuple[jax.Array, DecodeState]:
  """Runs the prompt through a fresh cache of `max_length` slots.

  Returns `(next-token logits [B, V] at each row's last real token, state)`.
  """
  variables = {"params": params}
  state = module.apply(variables, token_ids.shape[0], max_length, image_embeds, image_features,
                       slot_mask, method=MultimodalLM.start_decoding)
  out = module.apply(variables, token_ids, attention_mask, state=state)
  return last_real_token_logits(out["logits"], attention_mask), out["state"]


@functools.partial(jax.jit, static_argnames=("module",))
def decode_step(module: MultimodalLM, params: Any, token_ids: jax.Array,
                state: DecodeState) -> tuple[jax.Array, DecodeState]:
  """Appends `token_ids [B, k]` (all real) to the cache; returns `(logits [B, k, V], state)`."""
  out = module.apply({"params": params}, token_ids, jnp.ones(token_ids.shape, jnp.int32),
                     state=state)
  return out["logits"], out["state"]


@functools.partial(jax.jit, static_argnames=("module", "steps", "max_length"))
def greedy_decode(module: MultimodalLM, params: Any, token_ids: jax.Array,
                  attention_mask: jax.Array, image_embeds: jax.Array | None,
                  image_features: jax.Array | None, slot_mask: jax.Array | None, *,
                  steps: int, max_length: int) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding of `steps` tokens after the prompt, with the KV cache.

  Args:
    module, params: a `MultimodalLM` and its params.
    token_ids, attention_mask: the prompt `[B, L]`, padded on either side.
    image_embeds, image_features, slot_mask: the prompt's images (see `MultimodalLM`).
    steps: tokens to generate.
    max_length: cache slots, at least `L + steps`.
  Returns:
    `(tokens [B, steps], logits [B, steps, V])`: the chosen tokens and the logits each was
    chosen from.
  """
  if max_length < token_ids.shape[1] + steps:
    raise ValueError(f"greedy_decode: max_length {max_length} < prompt {token_ids.shape[1]} "
                     f"+ steps {steps}")
  logits, state = prefill(module, params, token_ids, attention_mask, image_embeds,
                          image_features, slot_mask, max_length)

  def step(carry, _):
    logits, state = carry
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_logits, state = decode_step(module, params, token[:, None], state)
    return (next_logits[:, 0], state), (token, logits)

  _, (tokens, chosen_from) = jax.lax.scan(step, (logits, state), None, length=steps)
  return tokens.T, chosen_from.transpose(1, 0, 2)


__all__ = ["decode_step", "greedy_decode", "last_real_token_logits", "prefill"]
