"""Fixed sine-cosine position tables (MAE's `get_2d_sincos_pos_embed` and its 1-D part).

The original builds these in NumPy float32 (`mm_interleaved/models/utils/pos_embed.py`); the same
NumPy operations run here, so the tables are bit-identical. They are constants: callers store
them as frozen params or fold them into the graph.
"""

from __future__ import annotations

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """`[M, dim]` table: `[sin(p * w_k), cos(p * w_k)]` with `w_k = 1 / 10000^(2k / dim)`.

  Args:
    dim: even table width.
    positions: any shape, flattened to M positions.
  """
  if dim % 2:
    raise ValueError(f"sincos_1d: dim must be even, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float32)
  omega /= dim / 2.0
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", np.asarray(positions).reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
  """`[grid_size**2 (+1), dim]` float32 table for a square grid, row-major.

  The first half of each row encodes the row index, the second half the column index. With
  `cls_token`, a zero row is prepended.
  """
  if dim % 4:
    raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid_x, grid_y = np.meshgrid(grid_w, grid_h)  # x (column) varies fastest
  table = np.concatenate([sincos_1d(dim // 2, grid_y), sincos_1d(dim // 2, grid_x)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros([1, dim]), table], axis=0)
  return table.astype(np.float32)
