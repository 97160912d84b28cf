"""Fingerprints of a train state and a data position, to tell an intact checkpoint from one
whose files were damaged after it was written.

Orbax writes each array's bytes as they are and reads back whatever the files hold: flipped
bits come back as wrong numbers without an error. So every checkpoint also records, at save
time, a 64-bit digest of each array of the `TrainState` (and a CRC of each process's data
iterator state); a restore recomputes them from what it read and compares.

`array_digests` runs a jitted program on each array: each element's bits (as uint32) are
mixed with its flat index (murmur3's finaliser) and summed modulo 2**32, twice with different
seeds. A sum does not depend on the order of its terms, so the digest is the same whatever the
state's sharding (a checkpoint written on one mesh and verified on another) and whatever the
reduction order; a changed element changes it except with odds of about 2**-64. The same pass
counts non-finite elements: a state holding NaN or inf is never saved or restored silently.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (a bijection of uint32 that spreads every bit)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_uint32(leaf: jax.Array) -> jax.Array:
  """Each element's bits as uint32, `[elements * words]` (64-bit elements give two words)."""
  if leaf.dtype == jnp.bool_:
    return leaf.astype(jnp.uint32).ravel()
  width = leaf.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()


def _leaf_fingerprint(leaf: jax.Array) -> jax.Array:
  """uint32 `[3]`: the two digest words and the count of non-finite elements."""
  bits = _as_uint32(leaf)
  index = jnp.arange(bits.size, dtype=jnp.uint32)
  words = [jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(seed))), dtype=jnp.uint32)
           for seed in _SEEDS]
  if jnp.issubdtype(leaf.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(leaf), dtype=jnp.uint32)
  else:
    nonfinite = jnp.uint32(0)
  return jnp.stack([*words, nonfinite])


# One small program per kind of array (shape, dtype, sharding): a state has hundreds of
# arrays but few kinds, and one program over all of them takes long to compile.
_leaf_fingerprint_program = jax.jit(_leaf_fingerprint)


def _paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def array_digests(tree: Any) -> tuple[dict[str, str], dict[str, int]]:
  """`({path: 16 hex digits}, {path: non-finite count})` of every array of `tree` (the second
  only for arrays holding non-finite values). A collective in a multi-process job."""
  fingerprints = [np.asarray(leaf) for leaf in jax.device_get(
      [_leaf_fingerprint_program(leaf) for leaf in jax.tree.leaves(tree)])]
  digests, nonfinite = {}, {}
  for path, (first, second, bad) in zip(_paths(tree), fingerprints):
    digests[path] = f"{int(first):08x}{int(second):08x}"
    if bad:
      nonfinite[path] = int(bad)
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
