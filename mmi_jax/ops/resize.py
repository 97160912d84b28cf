"""Image resizing with PyTorch's `F.interpolate` semantics (no antialiasing).

The original model resizes with `torch.nn.functional.interpolate`: its sin-cos position tables
with `mode="bicubic"` (cubic convolution with a = -0.75) and the ViT-Adapter's maps with
`mode="bilinear"`, both `align_corners=False` and without antialiasing. `jax.image.resize`
differs from both (a = -0.5 for cubic, and it antialiases when downsampling), so this module
computes torch's interpolation weights exactly, as one small `[out, in]` matrix per spatial axis,
and applies them as two matmuls at full float32 precision.

All arrays are channels-last: `[..., H, W, C]`.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient


def _source_scale(in_size: int, out_size: int, align_corners: bool,
                  scale_factor: float | None) -> float:
  """torch's `area_pixel_compute_scale`: how far one output step moves in the input."""
  if align_corners:
    return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  if scale_factor is not None:
    return 1.0 / scale_factor
  return in_size / out_size


def _cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """The 4 cubic-convolution taps at offsets -1, 0, 1, 2 for fractional positions `t`."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(in_size: int, out_size: int, mode: Literal["bilinear", "bicubic"],
                         align_corners: bool = False,
                         scale_factor: float | None = None) -> np.ndarray:
  """The `[out_size, in_size]` float32 matrix that resizes one axis as torch does.

  Args:
    in_size, out_size: lengths of the axis before and after.
    mode: "bilinear" (torch's linear taps, source index clamped at 0) or "bicubic" (4 taps,
      a = -0.75, indices clamped to the border).
    align_corners: torch's flag.
    scale_factor: the `scale_factor` passed to torch, if any; torch then maps coordinates with
      `1 / scale_factor` instead of `in_size / out_size`.
  """
  scale = _source_scale(in_size, out_size, align_corners, scale_factor)
  out_index = np.arange(out_size, dtype=np.float64)
  source = scale * out_index if align_corners else scale * (out_index + 0.5) - 0.5
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if mode == "bilinear":
    source = np.maximum(source, 0.0)
    low = np.floor(source).astype(np.int64)
    low = np.minimum(low, in_size - 1)
    high = np.where(low < in_size - 1, low + 1, low)
    frac = source - low
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
  elif mode == "bicubic":
    base = np.floor(source).astype(np.int64)
    weights = _cubic_weights(source - base)
    for tap in range(4):
      index = np.clip(base - 1 + tap, 0, in_size - 1)
      np.add.at(matrix, (rows, index), weights[:, tap])
  else:
    raise ValueError(f"interpolation_matrix: unknown mode {mode!r}; use 'bilinear' or 'bicubic'")
  return matrix.astype(np.float32)


def resize(images: jax.Array, size: tuple[int, int] | None = None, *,
           scale_factor: float | None = None,
           mode: Literal["bilinear", "bicubic"] = "bilinear",
           align_corners: bool = False) -> jax.Array:
  """`F.interpolate(x, size or scale_factor, mode, align_corners)` for channels-last arrays.

  Args:
    images: `[..., H, W, C]`.
    size: output `(H', W')`; exactly one of `size` and `scale_factor` is given.
    scale_factor: the same factor for both axes; `H' = floor(H * scale_factor)`.
    mode: "bilinear" or "bicubic" (a = -0.75), without antialiasing.
    align_corners: torch's flag.

  Returns:
    `[..., H', W', C]` in the input's dtype, computed in float32.
  """
  if (size is None) == (scale_factor is None):
    raise ValueError("resize: give exactly one of size and scale_factor")
  if images.ndim < 3:
    raise ValueError(f"resize: images must be [..., H, W, C], got shape {images.shape}")
  in_h, in_w = images.shape[-3], images.shape[-2]
  if size is None:
    out_h, out_w = math.floor(in_h * scale_factor), math.floor(in_w * scale_factor)
  else:
    out_h, out_w = (int(s) for s in size)
  if min(out_h, out_w) < 1:
    raise ValueError(f"resize: output size ({out_h}, {out_w}) from input ({in_h}, {in_w})")
  if (out_h, out_w) == (in_h, in_w) and not align_corners and scale_factor in (None, 1.0):
    return images  # torch copies the input unchanged
  rows = interpolation_matrix(in_h, out_h, mode, align_corners, scale_factor)
  cols = interpolation_matrix(in_w, out_w, mode, align_corners, scale_factor)
  highest = jax.lax.Precision.HIGHEST
  x = images.astype(jnp.float32)
  x = jnp.einsum("oh,...hwc->...owc", rows, x, precision=highest)
  x = jnp.einsum("pw,...owc->...opc", cols, x, precision=highest)
  return x.astype(images.dtype)
