"""Which params train: masks from path patterns, parameter counts, and params split into the
trainable and the frozen ones and merged back.

A model states what it freezes as regular expressions over '/'-joined param paths (the
visual tokenizer: the CLIP ViT trunk and the fixed position table). `unfrozen_mask` turns them
into a tree of booleans shaped like the params, True where no pattern matches; the training
optimizer (`mmi_jax.train.optimizer.trainable_mask`) starts from it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import flax.linen as nn
from flax import traverse_util


def unfrozen_mask(params: Any, frozen_patterns: Iterable[str]) -> dict[str, Any]:
  """A tree like `params` (plain, boxed or abstract) with False where a frozen pattern
  matches the param's path (`"encoder/encoder/layers_0/mlp/fc1/kernel"`), True elsewhere."""
  patterns = [re.compile(p) for p in frozen_patterns]
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  return traverse_util.unflatten_dict(
      {path: not any(p.search("/".join(path)) for p in patterns) for path in flat})


def count_params(params: Any, mask: Any = None) -> int:
  """Number of scalars in `params` (plain, boxed or abstract), only where `mask` is True."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  selected = traverse_util.flatten_dict(mask) if mask is not None else None
  return sum(math.prod(leaf.shape) for path, leaf in flat.items()
             if selected is None or selected[path])


def split_params(params: Any, mask: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(trainable, frozen)`: the leaves of `params` where `mask` is True / False, as nested
  dicts (boxed leaves stay boxed)."""
  flat = traverse_util.flatten_dict(params)
  selected = traverse_util.flatten_dict(nn.meta.unbox(mask))
  trainable = {path: leaf for path, leaf in flat.items() if selected[path]}
  frozen = {path: leaf for path, leaf in flat.items() if not selected[path]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Any, frozen: Any) -> dict[str, Any]:
  """The inverse of `split_params`: one nested dict with the leaves of both."""
  flat = traverse_util.flatten_dict(trainable)
  other = traverse_util.flatten_dict(frozen)
  overlap = flat.keys() & other.keys()
  if overlap:
    raise ValueError(f"params in both trees: {sorted('/'.join(p) for p in overlap)[:5]}")
  return traverse_util.unflatten_dict({**flat, **other})
