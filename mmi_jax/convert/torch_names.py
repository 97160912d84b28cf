"""Flax params <-> PyTorch state dicts: the tensor layouts, and filling params by name.

Keys follow the naming rule of `mmi_jax.param_names.torch_name`; layouts differ only for
kernels:

  * a 2-D kernel is transposed (`[in, out]` <-> `weight [out, in]`); a 4-D kernel is Flax's
    `[kh, kw, in, out]` <-> torch's `[out, in, kh, kw]` (`transpose(2, 3, 1, 0)`), which also
    holds for transposed convolutions built with `transpose_kernel=True`.

`params_from_state_dict` fills an abstract param tree from a state dict and reports every
missing key, unexpected key, shape mismatch and kind mismatch (an integer or bool tensor for a
float param, or the reverse: never cast) together.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmi_jax.param_names import torch_name

def from_torch_layout(path: Sequence[str], tensor: np.ndarray) -> np.ndarray:
  """A torch tensor rearranged into the layout of the Flax param at `path`."""
  if path[-1] == "kernel":
    if tensor.ndim == 2:
      return tensor.T
    if tensor.ndim == 4:
      return tensor.transpose(2, 3, 1, 0)
  return tensor


def to_torch_layout(path: Sequence[str], array: np.ndarray) -> np.ndarray:
  """The inverse of `from_torch_layout`."""
  if path[-1] == "kernel":
    if array.ndim == 2:
      return array.T
    if array.ndim == 4:
      return array.transpose(3, 2, 0, 1)
  return array


class ConversionError(ValueError):
  """A state dict does not match the params it should fill; the message lists every problem."""


def params_from_state_dict(abstract_params: Any, tensors: Mapping[str, Any] | Any,
                           prefix: str = "", *, ignore: Iterable[str] = (),
                           rename: Callable[[str], str] | None = None,
                           from_file_layout: Callable[[Sequence[str], np.ndarray],
                                                      np.ndarray] = from_torch_layout,
                           source: str = "state dict") -> dict[str, Any]:
  """Fills `abstract_params` from `tensors` (key -> array), checking that everything matches.

  Args:
    abstract_params: the target tree (shape structs, arrays, or boxed leaves); it fixes the
      expected names, shapes and dtypes.
    tensors: a mapping, or anything with `keys()` and `__getitem__` returning NumPy arrays
      (`checkpoint_files.CheckpointReader` streams them from disk).
    prefix: the keys' common prefix (`"vision_model."`, `"visual_tokenizer."`).
    ignore: regular expressions of keys (full, with prefix) that are known and unused, e.g. a
      pooler the model does not build. Keys outside `prefix` are ignored too.
    rename: optional map from the rule's key to the file's key, for the few names a family of
      checkpoints spells differently.
    from_file_layout: `(path, tensor) -> array` in the param's layout (`from_torch_layout`).
    source: a description of where the tensors come from, for the error message.

  Returns:
    A plain nested dict of NumPy arrays in the target dtypes.

  Raises:
    ConversionError: listing all missing keys, unexpected keys and shape mismatches.
  """
  ignore_patterns = [re.compile(pattern) for pattern in ignore]
  available = set(tensors.keys())
  missing, mismatched, wrong_kind, used = [], [], [], set()
  flat = {}
  for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(abstract_params)).items():
    key = torch_name(path, prefix)
    key = rename(key) if rename else key
    if key not in available:
      missing.append(f"{key} (for {'/'.join(path)} {tuple(leaf.shape)})")
      continue
    used.add(key)
    array = from_file_layout(path, np.asarray(tensors[key]))
    if tuple(array.shape) != tuple(leaf.shape):
      mismatched.append(f"{key}: file {tuple(array.shape)} (in Flax layout), "
                        f"model {tuple(leaf.shape)}")
      continue
    if _kind(array.dtype) != _kind(leaf.dtype):
      wrong_kind.append(f"{key}: file {array.dtype} ({_kind(array.dtype)}) for a "
                        f"{np.dtype(leaf.dtype)} param ({_kind(leaf.dtype)}): not cast")
      continue
    flat[path] = array.astype(leaf.dtype, order="C")
  unexpected = sorted(
      key for key in available - used
      if key.startswith(prefix) and not any(p.search(key) for p in ignore_patterns))
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("shape mismatch", mismatched), ("kind mismatch", wrong_kind)):
    if items:
      shown = "\n    ".join(items[:50]) + (f"\n    ... {len(items) - 50} more"
                                            if len(items) > 50 else "")
      problems.append(f"  {len(items)} {title}:\n    {shown}")
  if problems:
    raise ConversionError(f"{source} does not match the model (prefix {prefix!r}):\n"
                          + "\n".join(problems))
  return traverse_util.unflatten_dict(flat)


def _kind(dtype: Any) -> str:
  """"float" (bfloat16 included), "integer", "bool" or "other": what a cast may not change."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return "bool"
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  return "integer" if jnp.issubdtype(dtype, jnp.integer) else "other"


def check_same_tree(tree: Any, abstract: Any, what: str, against: str) -> dict[tuple, Any]:
  """The flattened `tree`, after checking its names and shapes against `abstract` (e.g. params
  about to be written against the model a config describes).

  Raises:
    ConversionError: listing every missing param, unexpected param and shape mismatch.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(tree))
  expected = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  missing = [f"{'/'.join(path)} {tuple(leaf.shape)}" for path, leaf in expected.items()
             if path not in flat]
  unexpected = ["/".join(path) for path in flat if path not in expected]
  mismatched = [f"{'/'.join(path)}: params {tuple(np.shape(flat[path]))}, model "
                f"{tuple(leaf.shape)}" for path, leaf in expected.items()
                if path in flat and tuple(np.shape(flat[path])) != tuple(leaf.shape)]
  problems = [f"  {len(items)} {title}:\n    " + "\n    ".join(items)
              for title, items in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatch", mismatched)) if items]
  if problems:
    raise ConversionError(f"params {what} do not match the model of {against}:\n"
                          + "\n".join(problems))
  return flat
