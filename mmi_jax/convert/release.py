"""The released MM-Interleaved PyTorch checkpoint <-> mmi_jax params, both ways.

The release's state dict uses the PyTorch module names that mmi_jax mirrors: keys are
`mmi_jax.param_names.release_name` of each param path (`layers_3/kernel` <->
`layers.3.weight`, with the release's exceptions), layouts torch's (kernels transposed), and
MMFS's `ignore_token` is stored `[1, 1, 1, D]` (`to_release_layout`).

The release also stores three buffers that mmi_jax recomputes: CLIP's mean and std
(`visual_tokenizer.clip_mean`/`clip_std`, `[1, 3, 1, 1]`) and the CLIP position ids. `load`
skips them knowingly; `save` writes them from the config.

* `load(path, model_config) -> params`: a safetensors or `.bin` file, a shard index json, or a
  directory holding one; every key must be used and every param found, else one
  `ConversionError` lists every missing key, unexpected key and shape mismatch.
* `save(params, model_config, directory)`: the release's names and shapes, as safetensors
  (sharded with an index json above `max_shard_bytes`).
* `expected_shapes(model_config) -> {name: shape}`: what `save` writes, computed abstractly;
  `param_shapes(model_config)`: the whole model's params as shape structs.

Both directions stream tensor by tensor (`checkpoint_files`), so converting the 13B model needs
about the model's size in memory, not twice that.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from mmi_jax import sharding
from mmi_jax.batch import example_batch
from mmi_jax.convert import checkpoint_files
from mmi_jax.convert.torch_names import (check_same_tree, from_torch_layout,
                                         params_from_state_dict, to_torch_layout)
from mmi_jax.models.mm_interleaved import MMInterleaved
from mmi_jax.param_names import release_key, release_key_of_rule, release_name

VISUAL_TOKENIZER_PREFIX = "visual_tokenizer."
CLIP_MEAN, CLIP_STD = "visual_tokenizer.clip_mean", "visual_tokenizer.clip_std"
POSITION_IDS = "visual_tokenizer.encoder.vision_model.embeddings.position_ids"
BUFFER_PATTERNS = (
    r"^visual_tokenizer\.clip_(mean|std)$",
    r"^visual_tokenizer\.encoder\.vision_model\.embeddings\.position_ids$",
)


def to_release_layout(path: Sequence[str], array: np.ndarray) -> np.ndarray:
  """A param in the release's layout (`[out, in]` kernels, NCHW convs, 4-D `ignore_token`)."""
  if path[-1] == "ignore_token":
    return array.reshape((1, 1, 1) + array.shape)
  return to_torch_layout(path, array)


def release_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
  """The release's shape of the param at `path` with mmi_jax shape `shape`."""
  return tuple(to_release_layout(path, np.broadcast_to(np.int8(0), tuple(shape))).shape)


def from_release_layout(path: Sequence[str], tensor: np.ndarray) -> np.ndarray:
  """The inverse of `to_release_layout`."""
  if path[-1] == "ignore_token" and tensor.ndim == 4 and tensor.shape[:3] == (1, 1, 1):
    return tensor.reshape(tensor.shape[3:])
  return from_torch_layout(path, tensor)


def buffers(model_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The persistent buffers of the release's state dict, from the config."""
  vision = model_config["vision_encoder"]
  grid = vision["image_size"] // vision["patch_size"]
  return {
      CLIP_MEAN: np.asarray(vision["pixel_mean"], np.float32).reshape(1, 3, 1, 1),
      CLIP_STD: np.asarray(vision["pixel_std"], np.float32).reshape(1, 3, 1, 1),
      POSITION_IDS: np.arange(1 + grid * grid, dtype=np.int64)[None],
  }


def param_shapes(model_config: Mapping[str, Any], param_dtype: Any = None) -> Any:
  """The whole model's params as boxed shape structs (nothing allocated; cached per config)."""
  param_dtype = jnp.dtype(param_dtype or model_config.get("param_dtype", "float32"))
  as_json = (model_config.to_json_best_effort(sort_keys=True)
             if hasattr(model_config, "to_json_best_effort") else None)
  if as_json is None:
    return _param_shapes(model_config, param_dtype)
  return _cached_param_shapes(as_json, param_dtype.name)


def _param_shapes(model_config, param_dtype):
  model = MMInterleaved.from_config(model_config, param_dtype=param_dtype)
  return sharding.abstract_params(model, example_batch(model_config))


@functools.lru_cache(maxsize=8)
def _cached_param_shapes(config_json: str, param_dtype: str):
  config = ml_collections.ConfigDict(json.loads(config_json))
  return _param_shapes(config, jnp.dtype(param_dtype))


def expected_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """`{release key: shape}` of everything `save` writes for this config (params and buffers),
  computed with `jax.eval_shape`."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(param_shapes(model_config)))
  shapes = {release_name(path): release_shape(path, leaf.shape) for path, leaf in flat.items()}
  shapes.update({key: value.shape for key, value in buffers(model_config).items()})
  return shapes


class _Progress:
  """A read-through view of a checkpoint that advances a progress bar per tensor read."""

  def __init__(self, tensors, bar):
    self._tensors, self._bar = tensors, bar

  def keys(self):
    return self._tensors.keys()

  def __getitem__(self, key):
    value = self._tensors[key]
    self._bar.update(1)
    return value


def _progress_bar(total: int, description: str, enabled: bool):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=description, unit="tensor", disable=not enabled)


def load(path: str | os.PathLike, model_config: Mapping[str, Any], *, dtype: Any = None,
         progress: bool = True) -> dict[str, Any]:
  """Reads a release state dict into the whole model's params.

  Args:
    path: a `.safetensors` / `.bin` / `.pth` file, a shard index json, or a directory with
      one of the usual weight file names.
    model_config: `config.model` describing the checkpoint's architecture.
    dtype: dtype of the returned params (None: `model_config.param_dtype`).
    progress: show a progress bar.
  Returns:
    Nested dict of NumPy arrays (host memory), the tree `MMInterleaved.init` makes.
  Raises:
    ConversionError: listing every missing key, unexpected key and shape mismatch.
    checkpoint_files.CheckpointFileError: the file cannot be read (truncated, corrupt).
  """
  abstract = param_shapes(model_config, dtype)
  tensors = checkpoint_files.open_checkpoint(path)
  count = len(traverse_util.flatten_dict(nn.meta.unbox(abstract)))
  with _progress_bar(count, f"reading {pathlib.Path(path).name}", progress) as bar:
    return params_from_state_dict(
        abstract, _Progress(tensors, bar), ignore=BUFFER_PATTERNS, rename=release_key_of_rule,
        from_file_layout=from_release_layout, source=f"release checkpoint {path}")


def state_dict_items(params: Any, model_config: Mapping[str, Any], *, dtype: Any = None,
                     check: bool = True) -> Iterator[tuple[str, np.ndarray]]:
  """`(release key, array in the release's layout)` for every tensor of the release's state
  dict (params, then buffers), one at a time.

  Args:
    params: the whole model's params (arrays of any kind; they are fetched one by one).
    dtype: cast floating params to this (None: keep each param's dtype).
    check: first compare the params' names and shapes with the config's model, raising one
      `ConversionError` that lists every difference.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  if check:
    check_same_tree(params, param_shapes(model_config), "to save", "this config")
  for path, leaf in flat.items():
    array = np.asarray(jax.device_get(leaf))
    if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
      array = array.astype(jnp.dtype(dtype))
    yield release_name(path), to_release_layout(path, array)
  yield from buffers(model_config).items()


def save(params: Any, model_config: Mapping[str, Any], directory: str | os.PathLike, *,
         dtype: Any = None, max_shard_bytes: int = 5 * 2**30,
         progress: bool = True) -> list[pathlib.Path]:
  """Writes `params` as the release's state dict: `directory/model.safetensors`, or shards
  `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

  Args:
    params: the whole model's params (checked against `model_config` first).
    dtype: cast floating params to this (None: keep their dtype).
    max_shard_bytes: largest shard.
  Returns:
    The files written.
  """
  items = state_dict_items(params, model_config, dtype=dtype)
  count = len(traverse_util.flatten_dict(nn.meta.unbox(params))) + len(buffers(model_config))
  with _progress_bar(count, f"writing {pathlib.Path(directory).name}", progress) as bar:
    return checkpoint_files.write_checkpoint(directory, items, base_name="model",
                                             max_shard_bytes=max_shard_bytes,
                                             progress=lambda key: bar.update(1))


def visual_tokenizer_params(abstract: Any, tensors: Mapping[str, Any], *,
                            source: str = "release checkpoint") -> dict[str, Any]:
  """The `VisualTokenizer` params from a release state dict (keys `visual_tokenizer.*`)."""
  return params_from_state_dict(abstract, tensors, VISUAL_TOKENIZER_PREFIX,
                                ignore=BUFFER_PATTERNS, rename=release_key, source=source)


__all__ = ["BUFFER_PATTERNS", "buffers", "expected_shapes", "from_release_layout", "load",
           "param_shapes", "release_shape", "save", "state_dict_items", "to_release_layout",
           "visual_tokenizer_params"]
