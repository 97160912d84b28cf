"""Fingerprints of a train state and a data position, to tell an intact checkpoint from one
whose files were damaged after it was written.

Orbax writes each array's bytes as they are and reads back whatever the files hold: flipped
bits come back as wrong numbers without an error. So every checkpoint also records, at save
time, a 64-bit digest of each array of the `TrainState` (and a CRC of each process's data
iterator state); a restore recomputes them from what it read and compares.

`array_digests`: each element's bits (as uint32) are mixed with its flat index in the whole
array (murmur3's finaliser) and summed modulo 2**32, twice with different seeds. A sum does not
depend on the order of its terms, so each process sums the shards it holds, each on its own
device, and one gather adds the processes' sums: the digest is the same whatever the state's
sharding (a checkpoint written on one mesh and verified on another), with no collective per
array. A changed element changes it except with odds of about 2**-64. The same pass counts
non-finite elements: a state holding NaN or inf is never saved or restored silently.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (a bijection of uint32 that spreads every bit)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_uint32(block: jax.Array) -> jax.Array:
  """Each element's bits as uint32, in `block`'s shape (64-bit types are not supported)."""
  if block.dtype == jnp.bool_:
    return block.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[block.dtype.itemsize]
  return jax.lax.bitcast_convert_type(block, unsigned).astype(jnp.uint32)


@jax.jit
def _shard_fingerprint(block: jax.Array, starts: jax.Array, strides: jax.Array) -> jax.Array:
  """uint32 `[3]` of one shard `block` of an array: the two digest words over its elements and
  its count of non-finite elements. `starts[d]`: the shard's first index along dimension d
  in the whole array; `strides[d]`: the whole array's row-major stride, so that each element
  is mixed with its flat index in the whole array."""
  index = jnp.zeros(block.shape, jnp.uint32)
  for dimension in range(block.ndim):
    along = jax.lax.broadcasted_iota(jnp.uint32, block.shape, dimension)
    index = index + (starts[dimension] + along) * strides[dimension]
  bits = _as_uint32(block)
  words = [jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(seed))), dtype=jnp.uint32)
           for seed in _SEEDS]
  if jnp.issubdtype(block.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(block), dtype=jnp.uint32)
  else:
    nonfinite = jnp.uint32(0)
  return jnp.stack([*words, nonfinite])


def _shards(leaf: Any) -> list[tuple[Any, tuple[slice, ...]]]:
  """`(block, index in the whole array)` of each shard this process holds once (a replicated
  shard is counted by the device holding replica 0); a host array is one whole shard."""
  if isinstance(leaf, jax.Array):
    return [(shard.data, shard.index) for shard in leaf.addressable_shards
            if shard.replica_id == 0]
  leaf = np.asarray(leaf)
  return [(leaf, tuple(slice(0, size) for size in leaf.shape))] if jax.process_index() == 0 else []


def array_digests(tree: Any) -> tuple[dict[str, str], dict[str, int]]:
  """`({path: 16 hex digits}, {path: non-finite count})` of every array of `tree` (the second
  only for arrays holding non-finite values), the same on every process.

  Each process digests the shards it holds, each on its own device (no collective per array),
  and one gather across processes adds the processes' sums."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  pending = []  # (leaf number, per-shard result)
  for number, (_, leaf) in enumerate(flat):
    shape = tuple(np.shape(leaf))
    strides = np.array([int(np.prod(shape[d + 1:])) for d in range(len(shape))], np.uint32)
    for block, index in _shards(leaf):
      starts = np.array([part.start or 0 for part in index], np.uint32)
      pending.append((number, _shard_fingerprint(block, starts, strides)))
  sums = np.zeros((len(flat), 3), np.uint64)
  for (number, _), result in zip(pending, jax.device_get([result for _, result in pending])):
    sums[number] += np.asarray(result, np.uint64)
  sums %= 1 << 32
  if jax.process_count() > 1:
    gathered = multihost_utils.process_allgather(sums.astype(np.uint32))
    sums = np.asarray(gathered, np.uint64).sum(0) % (1 << 32)
  digests, nonfinite = {}, {}
  for (path, _), (first, second, bad) in zip(flat, sums):
    key = jax.tree_util.keystr(path)
    digests[key] = f"{int(first):08x}{int(second):08x}"
    if bad:
      nonfinite[key] = int(bad)
  return digests, nonfinite


def data_digest(state: Any) -> int:
  """CRC-32 of a data iterator's state (`iterator.get_state()`, JSON data)."""
  return zlib.crc32(json.dumps(state, sort_keys=True).encode())


def differences(saved: dict[str, str], found: dict[str, str]) -> list[str]:
  """The paths whose digest differs (or that only one side has), as lines."""
  lines = []
  for path in sorted(saved.keys() | found.keys()):
    if path not in found:
      lines.append(f"{path}: in the record, not in the restored state")
    elif path not in saved:
      lines.append(f"{path}: not in the record")
    elif saved[path] != found[path]:
      lines.append(f"{path}: digest {found[path]}, recorded {saved[path]}")
  return lines


__all__ = ["array_digests", "data_digest", "differences"]
