"""The shapes dataset's word-level tokenizer (Hugging Face `tokenizers`).

Ids: 0 = `<pad>`, 1 = `<s>`, 2 = `</s>`, 3 = `<unk>`, then `shapes.WORDS` in order (29 ids in
all). Text splits on whitespace and punctuation. The image ids (soi, `<|image|>`) are not
words: they come from `config.model.tokens` and must lie above the words.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import models, pre_tokenizers

from mmi_jax.data import shapes

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


class ShapesTokenizer:
  """`encode(text) -> ids` (words only, no `<s>`/`</s>`), `decode(ids) -> text`.

  Attributes:
    tokenizer: the `tokenizers.Tokenizer` (WordLevel model, Whitespace pre-tokenizer).
    vocab_size: number of ids (special tokens + words).
    pad_id, bos_id, eos_id, unk_id: 0, 1, 2, 3.
  """

  def __init__(self):
    vocab = {word: index for index, word in enumerate(SPECIAL_TOKENS + shapes.WORDS)}
    self.tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    self.tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # <unk> stays an ordinary token, so decoding shows it.
    self.tokenizer.add_special_tokens([PAD, BOS, EOS])
    self.vocab_size = len(vocab)
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = (vocab[token] for token in
                                                          SPECIAL_TOKENS)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Any) -> str:
    """Words joined by spaces; `<pad>`, `<s>`, `</s>` and ids above the words are left out."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def check_compatible(self, tokens_config: Any) -> None:
    """Raises ValueError unless `config.model.tokens` can carry this tokenizer's ids.

    The words must fit below `text_vocab_size`, `<s>`/`</s>` must be the config's bos/eos,
    and the pad, soi and `<|image|>` ids must not be words (pad may be 0, the tokenizer's own).
    """
    if self.vocab_size > tokens_config.text_vocab_size:
      raise ValueError(f"the shapes tokenizer has {self.vocab_size} ids, more than "
                       f"model.tokens.text_vocab_size {tokens_config.text_vocab_size}")
    if (tokens_config.bos_id, tokens_config.eos_id) != (self.bos_id, self.eos_id):
      raise ValueError(f"the shapes tokenizer has <s> = {self.bos_id}, </s> = {self.eos_id}; "
                       f"model.tokens has bos_id {tokens_config.bos_id}, eos_id "
                       f"{tokens_config.eos_id}")
    for name in ("pad_id", "soi_id", "image_id"):
      value = tokens_config[name]
      if value < self.vocab_size and not (name == "pad_id" and value == self.pad_id):
        raise ValueError(f"model.tokens.{name} {value} is an id of the shapes tokenizer's words "
                         f"(ids < {self.vocab_size}); it must be at least {self.vocab_size}"
                         + (f" or {self.pad_id}" if name == "pad_id" else ""))


def shapes_tokenizer(text_vocab_size: int | None = 64) -> ShapesTokenizer:
  """The tokenizer; raises ValueError if it has more ids than `text_vocab_size` (None: any)."""
  tokenizer = ShapesTokenizer()
  if text_vocab_size is not None and tokenizer.vocab_size > text_vocab_size:
    raise ValueError(f"the shapes tokenizer has {tokenizer.vocab_size} ids, more than "
                     f"text_vocab_size {text_vocab_size}")
  return tokenizer


__all__ = ["SPECIAL_TOKENS", "ShapesTokenizer", "shapes_tokenizer"]
