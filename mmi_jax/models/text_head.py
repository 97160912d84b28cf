"""The text head of MM-Interleaved (the release's `text_decoder`, SPEC section 5).

`head` is a biased Linear over the whole vocabulary (32002), initialised from the LLM's
`lm_head` with the rows of the new ids (soi, `<|image|>`) zero and their bias -100, and frozen.
`head_new` is a trainable Linear onto the new ids only (weight 0, bias 95 at init), added to
their logits. At initialisation the new ids' logits are therefore `0 * h - 100 + 95 = -5`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.models.linear import Linear


class TextHead(nn.Module):
  """`logits = head(h)`, plus `head_new(h)` on the ids from `text_vocab_size` on.

  Attributes:
    vocab_size: all ids (32002).
    text_vocab_size: the LLM's original vocabulary (32000); ids from here on are new.
    new_token_bias: init of `head.bias` for the new ids (-100).
    head_new_bias: init of `head_new.bias` (95).
  """

  vocab_size: int
  text_vocab_size: int
  new_token_bias: float = -100.0
  head_new_bias: float = 95.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    """`[B, L, D]` -> float32 logits `[B, L, vocab_size]`."""
    if not 0 < self.text_vocab_size < self.vocab_size:
      raise ValueError(f"TextHead: text_vocab_size {self.text_vocab_size} must be in "
                       f"(0, vocab_size {self.vocab_size})")
    new_ids = self.vocab_size - self.text_vocab_size

    def head_bias_init(key, shape, dtype=jnp.float32):
      del key
      return jnp.zeros(shape, dtype).at[self.text_vocab_size:].set(self.new_token_bias)

    def head_kernel_init(key, shape, dtype=jnp.float32):
      kernel = nn.initializers.xavier_uniform()(key, shape, dtype)
      return kernel.at[:, self.text_vocab_size:].set(0.0)

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    logits = Linear(self.vocab_size, kernel_axes=("embed", "vocab"),
                    kernel_init=head_kernel_init, bias_init=head_bias_init, name="head",
                    **kw)(hidden_states).astype(jnp.float32)
    new_logits = Linear(new_ids, kernel_axes=("embed", None), kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.constant(self.head_new_bias),
                        name="head_new", **kw)(hidden_states).astype(jnp.float32)
    return logits.at[..., self.text_vocab_size:].add(new_logits)


def head_from_lm_head(lm_head_kernel: np.ndarray, vocab_size: int, text_vocab_size: int,
                      new_token_bias: float = -100.0) -> dict[str, np.ndarray]:
  """`head`'s params as the release's `TextDecoder.init_from_llm` sets them (frozen head).

  Args:
    lm_head_kernel: `[D, V]` the LLM's `lm_head` kernel (V >= vocab_size after growing it, or
      V = text_vocab_size).
  Returns:
    `{"kernel": [D, vocab_size], "bias": [vocab_size]}`: the first `text_vocab_size` columns
    copied, the new ids' columns zero and their bias `new_token_bias`.
  """
  kernel = np.zeros((lm_head_kernel.shape[0], vocab_size), lm_head_kernel.dtype)
  kernel[:, :text_vocab_size] = lm_head_kernel[:, :text_vocab_size]
  bias = np.zeros((vocab_size,), lm_head_kernel.dtype)
  bias[text_vocab_size:] = new_token_bias
  return {"kernel": kernel, "bias": bias}


__all__ = ["TextHead", "head_from_lm_head"]
