"""The PyTorch state-dict name of every mmi_jax param: one rule and the release's exceptions.

mmi_jax modules are named after the PyTorch modules they mirror, so a param path maps to a
state-dict key by rule, not by table (`torch_name`):

  * a module named `name_N` (a list entry in Flax) is `name.N` in torch
    (`encoder/layers_3/...` <-> `encoder.layers.3....`);
  * leaves `kernel` (Linear, Conv), `scale` (LayerNorm) and `embedding` (Embed) are torch's
    `weight`; `bias` is `bias`; any other leaf is a bare `nn.Parameter` of the same name.

The released checkpoint's keys (`release_name`) follow the rule with three exceptions:

  * diffusers spells one UNet module with a literal `_N` (`time_embedding.linear_1`), which
    the rule would read as a list entry (`diffusers_key`);
  * the vision encoder sits in Hugging Face's model wrapper:
    `visual_tokenizer.encoder.vision_model.` (mmi_jax: `visual_tokenizer/encoder/`;
    `release_key`);
  * MMFS's relative-image-position table is an `nn.Embedding` (`query_relpos.weight`).

The training optimizer matches its learning-rate groups against these names, as the release
does; the converters (`mmi_jax.convert`) read and write checkpoints under them.
"""

from __future__ import annotations

import re
from typing import Sequence

_LIST_ENTRY = re.compile(r"^(.+)_(\d+)$")
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_LITERAL_UNDERSCORE = re.compile(r"(^|\.)time_embedding\.linear\.([12])\.")

# (the rule's key prefix, the release's key prefix)
VISUAL_TOKENIZER_RENAMES = (
    ("visual_tokenizer.encoder.", "visual_tokenizer.encoder.vision_model."),
)


def torch_name(path: Sequence[str], prefix: str = "") -> str:
  """The state-dict key of the param at Flax `path` (a tuple of names), after `prefix`."""
  *modules, leaf = path
  parts = []
  for module in modules:
    match = _LIST_ENTRY.match(module)
    parts.extend(match.groups() if match else (module,))
  parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
  return prefix + ".".join(parts)


def diffusers_key(key: str) -> str:
  """The diffusers key of a UNet key built by the `torch_name` rule."""
  return _LITERAL_UNDERSCORE.sub(r"\1time_embedding.linear_\2.", key)


def release_key(key: str, renames=VISUAL_TOKENIZER_RENAMES) -> str:
  """The release's key for a key built by the `torch_name` rule (the wrapper prefix)."""
  for ours, theirs in renames:
    if key.startswith(ours):
      return theirs + key[len(ours):]
  return key


def release_key_of_rule(key: str) -> str:
  """The release's key for the whole model's key built by the `torch_name` rule."""
  key = release_key(diffusers_key(key))
  return key + ".weight" if key.split(".")[-1] == "query_relpos" else key


def release_name(path: Sequence[str]) -> str:
  """The release's state-dict key of the param at `path` of the whole model's params."""
  return release_key_of_rule(torch_name(path))


__all__ = ["VISUAL_TOKENIZER_RENAMES", "diffusers_key", "release_key", "release_key_of_rule",
           "release_name", "torch_name"]
