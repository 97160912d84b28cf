"""Reading PyTorch checkpoints tensor by tensor: safetensors, `.bin`, and sharded indexes.

`open_checkpoint(path)` accepts a file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, or an
`*.index.json` of shards) or a directory holding one of the usual names (Hugging Face's
`model.safetensors`, `pytorch_model.bin`, diffusers' `diffusion_pytorch_model.*`, each possibly
sharded with an index). Tensors are read on demand, so converting a model needs memory for the
model, not for a second copy of the file. `.bin` files are read with
`torch.load(..., weights_only=True)` only (never unpickling arbitrary objects), memory-mapped
when their format allows it.

Tensors come back as NumPy arrays in their stored dtype (bfloat16 as `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np

WEIGHT_FILE_NAMES = (
    "model.safetensors", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # noqa: PLC0415 (torch is needed only to read torch files)

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class _SafetensorsFile:
  def __init__(self, path: pathlib.Path):
    from safetensors import safe_open  # noqa: PLC0415

    self._file = safe_open(str(path), framework="pt")

  def keys(self) -> list[str]:
    return list(self._file.keys())

  def get(self, key: str) -> np.ndarray:
    return _torch_to_numpy(self._file.get_tensor(key))


class _TorchFile:
  def __init__(self, path: pathlib.Path):
    import torch  # noqa: PLC0415

    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
      state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                         dict):
      state = state["state_dict"]
    if not isinstance(state, dict):
      raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    self._state = state

  def keys(self) -> list[str]:
    return [key for key, value in self._state.items() if hasattr(value, "shape")]

  def get(self, key: str) -> np.ndarray:
    return _torch_to_numpy(self._state[key])


def _open_file(path: pathlib.Path):
  if path.suffix == ".safetensors":
    return _SafetensorsFile(path)
  if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
    return _TorchFile(path)
  raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors or .bin)")


class CheckpointReader:
  """A read-only mapping from state-dict key to NumPy array, over one file or shards.

  At most one `.bin` shard is held open at a time (safetensors shards are memory-mapped).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if self.path.name.endswith(".index.json"):
      index = json.loads(self.path.read_text())
      if "weight_map" not in index:
        raise ValueError(f"{self.path}: an index json needs a 'weight_map'")
      self._shard_of = {key: self.path.parent / shard
                        for key, shard in index["weight_map"].items()}
    else:
      self._shard_of = None
      self._single = _open_file(self.path)
    self._open_path: pathlib.Path | None = None
    self._open = None
    self._keys = list(self._shard_of) if self._shard_of is not None else self._single.keys()
    self._key_set = frozenset(self._keys)

  def keys(self) -> list[str]:
    return list(self._keys)

  def __contains__(self, key: str) -> bool:
    return key in self._key_set

  def __getitem__(self, key: str) -> np.ndarray:
    if self._shard_of is None:
      return self._single.get(key)
    if key not in self._shard_of:
      raise KeyError(f"{key} is not in {self.path}")
    shard = self._shard_of[key]
    if shard != self._open_path:
      if not shard.exists():
        raise FileNotFoundError(f"{shard} (named by {self.path} for {key}) does not exist")
      self._open, self._open_path = _open_file(shard), shard
    return self._open.get(key)


def find_weights_file(directory: str | os.PathLike) -> pathlib.Path:
  """The weights file (or shard index) of a checkpoint directory; safetensors preferred."""
  directory = pathlib.Path(directory)
  for name in WEIGHT_FILE_NAMES:
    if (directory / name).exists():
      return directory / name
  found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  raise FileNotFoundError(f"{directory}: no weights file; expected one of "
                          f"{', '.join(WEIGHT_FILE_NAMES)}; found {found}")


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
  """A `CheckpointReader` for a weights file, shard index, or checkpoint directory."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  return CheckpointReader(find_weights_file(path) if path.is_dir() else path)
