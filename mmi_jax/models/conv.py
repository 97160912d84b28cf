"""`torch.nn.Conv2d` and `ConvTranspose2d` in Flax (channels-last), with logical axis names.

Flax's convolutions with torch's padding arithmetic, torch's default initialization and named
kernel axes. Kernels are Flax's `[kh, kw, in / groups, out]`; torch's `weight [out, in / groups,
kh, kw]` maps to it with `transpose(2, 3, 1, 0)`. The transposed convolution uses
`transpose_kernel=True`, so it computes exactly torch's `conv_transpose2d` (the gradient of a
convolution) and its kernel `[kh, kw, out, in]` maps from torch's `[in, out, kh, kw]` with the
same transpose. `DepthwiseConv2d` is torch's `groups=channels` convolution with the same
params, computed without a grouped convolution (see its docstring).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax.models.linear import torch_default_bias_init, torch_default_kernel_init


def Conv2d(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,  # noqa: N802
           groups: int = 1, use_bias: bool = True, in_features: int,
           kernel_axes: tuple[str | None, str | None] = (None, None), kernel_init=None,
           bias_init=None, dtype: Any = None, param_dtype: Any = jnp.float32,
           precision: Any = None, name: str | None = None) -> nn.Conv:
  """`nn.Conv2d(in_features, features, kernel_size, stride, padding, groups=groups)`.

  Args:
    in_features: the input width (needed for torch's fan-in based bias init).
    kernel_axes: logical names of the kernel's (in, out) dims; the spatial dims are never
      sharded.
    kernel_init, bias_init: default to PyTorch's.
  """
  fan_in = in_features // groups * kernel_size * kernel_size
  kernel_init = kernel_init or torch_default_kernel_init
  bias_init = bias_init or torch_default_bias_init(fan_in)
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), feature_group_count=groups,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
      kernel_init=nn.with_logical_partitioning(kernel_init, (None, None) + tuple(kernel_axes)),
      bias_init=nn.with_logical_partitioning(bias_init, kernel_axes[1:]), name=name)


class DepthwiseConv2d(nn.Module):
  """`nn.Conv2d(features, features, kernel_size, padding=padding, groups=features)`, stride 1.

  Params as `Conv2d(..., groups=features)` makes them (`kernel [k, k, 1, features]`,
  `bias [features]`), computed as k * k shifted multiply-adds instead of a grouped
  convolution: XLA's SPMD partitioner doubles the kernel's gradient of a grouped convolution
  on a sharded batch (jax 0.10, CPU, mesh (2, 2, 2)); elementwise products have no such
  problem, and for a 3x3 depthwise kernel they are as cheap.

  Attributes:
    kernel_axes: logical name of the channel dim.
  """

  features: int
  kernel_size: int = 3
  padding: int = 1
  kernel_axes: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, features]` -> `[B, H', W', features]` (H' = H + 2 * padding - k + 1)."""
    size = self.kernel_size
    kernel = self.param("kernel", nn.with_logical_partitioning(
        torch_default_kernel_init, (None, None, None, self.kernel_axes)),
                        (size, size, 1, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        torch_default_bias_init(size * size), (self.kernel_axes,)), (self.features,),
                      self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    pad = self.padding
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height = padded.shape[1] - size + 1
    width = padded.shape[2] - size + 1
    out = sum(padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
              for i in range(size) for j in range(size))
    return out + bias.astype(dtype)


def ConvTranspose2d(features: int, kernel_size: int, *, stride: int,  # noqa: N802
                    kernel_axes: tuple[str | None, str | None] = (None, None),
                    dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                    name: str | None = None) -> nn.ConvTranspose:
  """`nn.ConvTranspose2d(in, features, kernel_size, stride)` with torch's padding 0.

  `kernel_axes` names the torch (in, out) dims; the Flax kernel is `[kh, kw, out, in]`.
  Torch's default init counts fan-in as `out * kh * kw` for a transposed conv, which is the
  product of the Flax kernel's leading dims, as `torch_default_kernel_init` computes.
  """
  fan_in = features * kernel_size * kernel_size
  return nn.ConvTranspose(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding="VALID",
      transpose_kernel=True, dtype=dtype, param_dtype=param_dtype, precision=precision,
      kernel_init=nn.with_logical_partitioning(
          torch_default_kernel_init, (None, None, kernel_axes[1], kernel_axes[0])),
      bias_init=nn.with_logical_partitioning(torch_default_bias_init(fan_in), kernel_axes[1:]),
      name=name)
