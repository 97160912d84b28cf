"""`torch.nn.Linear` in Flax Linen, with logical axis names on its params.

Differences from `flax.linen.Dense`, each needed to mirror the original model:
  * the default initializers are PyTorch's (`kaiming_uniform_(a=sqrt(5))` for the weight,
    `uniform(+-1/sqrt(fan_in))` for the bias), because the original leaves many projections
    at their PyTorch defaults;
  * the call can skip the bias (`add_bias=False`), so a module can push a table of embeddings
    through the same weight once (MMFS adds projected position embeddings to projected
    queries instead of projecting every query-image pair);
  * `kernel` is `[in, out]` (the transpose of torch's `weight [out, in]`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """`nn.Linear` / `nn.Conv2d`'s default weight init: U(+-1/sqrt(fan_in)).

  Works for a Linear kernel `[in, out]` and a Flax conv kernel `[kh, kw, in / groups, out]`
  (fan_in = all dims but the last), which is how torch counts it too.
  """
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int) -> Initializer:
  """`nn.Linear`'s default bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Linear(nn.Module):
  """`y = x @ kernel + bias`; mirrors `torch.nn.Linear` (weight = kernel.T).

  Attributes:
    features: output width.
    kernel_axes: logical names of the kernel's `(in, out)` dims; the bias takes the second.
    kernel_init: defaults to PyTorch's.
    bias_init: defaults to PyTorch's (which depends on the input width).
    dtype: computation dtype (inputs and params are cast to it); None keeps the input's.
    param_dtype: storage dtype of the params.
    precision: matmul precision (`jax.lax.Precision` or name); None uses JAX's default.
  """

  features: int
  kernel_axes: tuple[str | None, str | None] = (None, None)
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, add_bias: bool = True) -> jax.Array:
    """`inputs [..., in]` -> `[..., features]`; `add_bias=False` applies the kernel only."""
    in_features = inputs.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (in_features, self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(inputs.dtype, self.param_dtype)
    outputs = jnp.matmul(inputs.astype(dtype), kernel.astype(dtype), precision=self.precision)
    if self.use_bias:
      bias_init = self.bias_init or torch_default_bias_init(in_features)
      bias = self.param("bias", nn.with_logical_partitioning(bias_init, self.kernel_axes[1:]),
                        (self.features,), self.param_dtype)
      if add_bias:
        outputs = outputs + bias.astype(dtype)
    return outputs
