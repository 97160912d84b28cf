"""`torch.nn.LayerNorm` in Flax, with logical axis names on its params.

`flax.linen.LayerNorm` with two settings changed to mirror PyTorch: the variance is computed
two-pass (`E[(x - mean)^2]`, as torch does, not `E[x^2] - mean^2`), and the scale and bias
carry a logical axis name for sharding. Param names stay Flax's (`scale`, `bias`); conversion
maps `scale` to torch's `weight`. `ChannelsFirstLayerNorm` is the same computation under a
distinct class, for the ViT-Adapter's own `LayerNorm` module, which is not a
`torch.nn.LayerNorm` (the optimizer tells the two apart: HF Trainer exempts only
`torch.nn.LayerNorm` params from weight decay).

`GroupNorm` is `torch.nn.GroupNorm` on channels-last maps (two-pass variance, float32
statistics); Flax groups contiguous channels exactly as torch does.

`RMSNorm` is Hugging Face's `LlamaRMSNorm` (float32 statistics, weight applied in the input's
dtype).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ChannelsFirstLayerNorm(nn.LayerNorm):
  """The ViT-Adapter's `LayerNorm(data_format="channels_first")` (`adapter_modules.py`, the
  spatial prior module's norms): the release's own `nn.Module`, normalizing dim 1 of NCHW maps.
  mmi_jax's maps are channels-last, so the computation is `nn.LayerNorm`'s over the last axis;
  the class differs only so that the module type records which torch class it mirrors."""


def LayerNorm(*, epsilon: float, axis_name: str | None, dtype: Any = None,  # noqa: N802
              param_dtype: Any = jnp.float32, name: str | None = None,
              module_class: type[nn.LayerNorm] = nn.LayerNorm) -> nn.LayerNorm:
  """A LayerNorm over the last axis whose statistics are computed in float32.

  Args:
    epsilon: torch's `eps` (check each original module: 1e-5, 1e-6 and 1e-12 all occur).
    axis_name: logical axis name of the normalized (last) dim.
    dtype: output dtype; None keeps the input's. `float32` computes the whole norm in float32
      (the ViT-Adapter's channels-first LayerNorm).
    param_dtype: storage dtype of scale and bias.
    name: the module name (torch's attribute name).
    module_class: `nn.LayerNorm` (mirrors `torch.nn.LayerNorm`) or `ChannelsFirstLayerNorm`.
  """
  return module_class(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
      name=name)


def GroupNorm(*, num_groups: int, epsilon: float, axis_name: str | None = "embed",  # noqa: N802
              dtype: Any = None, param_dtype: Any = jnp.float32,
              name: str | None = None) -> nn.GroupNorm:
  """`torch.nn.GroupNorm(num_groups, channels, eps)` over `[B, ..., C]` (channels last).

  Args:
    num_groups: torch's `num_groups`; must divide the channel count.
    epsilon: torch's `eps` (Stable Diffusion uses 1e-5 in the UNet's resnets, 1e-6 elsewhere).
    axis_name: logical axis name of the channel dim.
    dtype, param_dtype, name: as `LayerNorm`.
  """
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
      name=name)


class RMSNorm(nn.Module):
  """Hugging Face's `LlamaRMSNorm`: `weight * (x / sqrt(mean(x^2) + eps))`.

  The statistics and the normalization are computed in float32; the result is cast back to
  the input's dtype before the weight multiplies it, as Hugging Face does.

  Attributes:
    epsilon: `rms_norm_eps`.
    axis_name: logical axis name of the normalized (last) dim.
    dtype: output dtype; None: the input's.
    param_dtype: storage dtype of the weight (`scale`, torch's `weight`).
  """

  epsilon: float = 1e-6
  axis_name: str | None = "embed"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    normalized = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                     + self.epsilon)
    return scale.astype(dtype) * normalized.astype(x.dtype).astype(dtype)
