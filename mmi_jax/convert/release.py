"""Names of the released MM-Interleaved PyTorch checkpoint, component by component.

The release's state dict uses the PyTorch module names that mmi_jax mirrors, so keys follow
the rule in `torch_names`, under a component prefix, with a few renames where the release
wraps a module (the vision encoder sits in Hugging Face's `CLIPVisionAdapterModel`, hence
`visual_tokenizer.encoder.vision_model.`). Buffers the release stores but mmi_jax recomputes
(CLIP's mean and std, position ids) are listed so that loading skips them knowingly.
"""

from __future__ import annotations

from typing import Any, Mapping

from mmi_jax.convert.torch_names import params_from_state_dict

VISUAL_TOKENIZER_PREFIX = "visual_tokenizer."
# (mmi_jax rule's key prefix, release key prefix)
VISUAL_TOKENIZER_RENAMES = (
    ("visual_tokenizer.encoder.", "visual_tokenizer.encoder.vision_model."),
)
VISUAL_TOKENIZER_BUFFERS = (
    r"^visual_tokenizer\.clip_(mean|std)$",
    r"^visual_tokenizer\.encoder\.vision_model\.embeddings\.position_ids$",
)


def release_key(key: str, renames=VISUAL_TOKENIZER_RENAMES) -> str:
  """The release's key for a key built by the `torch_names` rule."""
  for ours, theirs in renames:
    if key.startswith(ours):
      return theirs + key[len(ours):]
  return key


def visual_tokenizer_params(abstract: Any, tensors: Mapping[str, Any], *,
                            source: str = "release checkpoint") -> dict[str, Any]:
  """The `VisualTokenizer` params from a release state dict (keys `visual_tokenizer.*`)."""
  return params_from_state_dict(abstract, tensors, VISUAL_TOKENIZER_PREFIX,
                                ignore=VISUAL_TOKENIZER_BUFFERS, rename=release_key,
                                source=source)
