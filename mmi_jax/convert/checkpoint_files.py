"""Reading and writing PyTorch checkpoints tensor by tensor: safetensors, `.bin`, shard indexes.

`open_checkpoint(path)` accepts a file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, or an
`*.index.json` of shards) or a directory holding one of the usual names (Hugging Face's
`model.safetensors`, `pytorch_model.bin`, diffusers' `diffusion_pytorch_model.*`, each possibly
sharded with an index). Tensors are read on demand, so converting a model needs memory for the
model, not for a second copy of the file. `.bin` files are read with
`torch.load(..., weights_only=True)` only (never unpickling arbitrary objects), memory-mapped
when their format allows it.

Tensors come back as NumPy arrays in their stored dtype (bfloat16 as `ml_dtypes.bfloat16`).
A file that cannot be read (truncated, corrupt, not a checkpoint) raises `CheckpointFileError`
naming the file, not a library's internal error.

`write_checkpoint(directory, tensors)` writes `(key, array)` pairs as they come into
safetensors shards of at most `max_shard_bytes`, with Hugging Face's names
(`model.safetensors`, or `model-00001-of-00003.safetensors` + `model.safetensors.index.json`),
so writing a model needs memory for one shard beyond the model itself.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable

import ml_dtypes
import numpy as np

WEIGHT_FILE_NAMES = (
    "model.safetensors", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)


class CheckpointFileError(ValueError):
  """A checkpoint file cannot be read (truncated, corrupt, or not a checkpoint)."""


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # noqa: PLC0415 (torch is needed only to read torch files)

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class _SafetensorsFile:
  def __init__(self, path: pathlib.Path):
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    self._path, self._error = path, SafetensorError
    try:
      self._file = safe_open(str(path), framework="pt")
    except SafetensorError as error:
      raise CheckpointFileError(
          f"{path}: not a readable safetensors file ({error}); it is probably truncated or "
          f"corrupt ({path.stat().st_size} bytes on disk)") from None

  def keys(self) -> list[str]:
    return list(self._file.keys())

  def get(self, key: str) -> np.ndarray:
    try:
      return _torch_to_numpy(self._file.get_tensor(key))
    except self._error as error:
      raise CheckpointFileError(f"{self._path}: cannot read {key!r} ({error})") from None


class _TorchFile:
  def __init__(self, path: pathlib.Path):
    import torch  # noqa: PLC0415

    try:
      try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
      raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint ({error}); it is "
                                "probably truncated or corrupt") from None
    except Exception as error:  # the pickle module's UnpicklingError and kin
      raise CheckpointFileError(f"{path}: cannot be loaded with torch.load(weights_only=True) "
                                f"({type(error).__name__}: {error})") from None
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
      try:
        index = json.loads(self.path.read_text())
      except json.JSONDecodeError as error:
        raise CheckpointFileError(f"{self.path}: not valid JSON ({error})") from None
      if not isinstance(index, dict) or "weight_map" not in index:
        raise ValueError(f"{self.path}: an index json needs a 'weight_map'")
      self._shard_of = {key: self.path.parent / shard
                        for key, shard in index["weight_map"].items()}
      directory = self.path.parent.resolve()
      for key, shard in index["weight_map"].items():
        if not (directory / shard).resolve().is_relative_to(directory):
          raise CheckpointFileError(f"{self.path}: shard {shard!r} (of {key}) leaves the "
                                    f"checkpoint's directory {directory}")
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


def _torch_tensor(array: np.ndarray):
  import torch  # noqa: PLC0415

  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def write_checkpoint(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                     *, base_name: str = "model", max_shard_bytes: int = 5 * 2**30,
                     progress=None) -> list[pathlib.Path]:
  """Writes `(key, array)` pairs, as they come, into safetensors shards under `directory`.

  Args:
    directory: created if missing; existing files of the same base name are replaced.
    tensors: an iterable of (state-dict key, NumPy array); bfloat16 is `ml_dtypes.bfloat16`.
    base_name: `model` (transformers) or `diffusion_pytorch_model` (diffusers).
    max_shard_bytes: a shard is closed before it would grow past this (a single larger
      tensor gets a shard of its own). Everything within one shard: `{base_name}.safetensors`.
    progress: optional callable run with each key after it is queued (a progress bar's hook).
  Returns:
    The files written (shards, then the index if any).
  """
  from safetensors.torch import save_file  # noqa: PLC0415

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shards: list[list[str]] = []
  pending: dict[str, object] = {}
  pending_bytes = 0
  seen: set[str] = set()

  def flush():
    nonlocal pending, pending_bytes
    if pending:
      save_file(pending, str(directory / f".{base_name}-part{len(shards):05d}.tmp"),
                metadata={"format": "pt"})
      shards.append(list(pending))
      pending, pending_bytes = {}, 0

  for key, array in tensors:
    if key in seen:
      raise ValueError(f"write_checkpoint: key {key!r} given twice")
    seen.add(key)
    array = np.asarray(array)
    if pending and pending_bytes + array.nbytes > max_shard_bytes:
      flush()
    pending[key] = _torch_tensor(array)
    pending_bytes += array.nbytes
    if progress is not None:
      progress(key)
  flush()

  count = len(shards)
  stale = list(directory.glob(f"{base_name}-*-of-*.safetensors"))
  stale += [directory / f"{base_name}.safetensors"] if count > 1 else []
  for path in stale:  # a previous write's files would shadow or confuse this one's
    path.unlink(missing_ok=True)
  names = ([f"{base_name}.safetensors"] if count <= 1 else
           [f"{base_name}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
  written = []
  for index, name in enumerate(names[:count]):
    os.replace(directory / f".{base_name}-part{index:05d}.tmp", directory / name)
    written.append(directory / name)
  index_path = directory / f"{base_name}.safetensors.index.json"
  if count > 1:
    total = sum(os.path.getsize(path) for path in written)
    weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
    index_path.write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": weight_map}, indent=2))
    written.append(index_path)
  elif index_path.exists():
    index_path.unlink()
  return written
