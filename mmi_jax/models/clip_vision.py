"""CLIP's vision transformer (ViT-L/14 in MM-Interleaved), mirroring Hugging Face's.

`CLIPVisionTransformer` is `transformers.CLIPVisionModel.vision_model` without the pooler:
patch, class and position embeddings, `pre_layrnorm`, and pre-LN encoder layers. Param names
follow Hugging Face's (`embeddings/patch_embedding`, `encoder/layers_3/self_attn/q_proj`, ...),
so a checkpoint maps one-to-one (`mmi_jax.convert.hf.load_clip_vision`). MM-Interleaved uses
no post-LayerNorm (`post_layernorm` is `nn.Identity` in the release), so none is built.

Images are channels-last `[B, H, W, C]`, already normalized. At a size other than the
position table's, the table's patch part is resized with PyTorch's bicubic (a = -0.75,
`align_corners=False`), as Hugging Face's `interpolate_pos_encoding=True` does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax import sharding
from mmi_jax.models.conv import Conv2d
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import LayerNorm
from mmi_jax.models.remat import remat_layer
from mmi_jax.ops.resize import resize


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def resize_position_table(table: jax.Array, grid: tuple[int, int],
                          align_corners: bool = False) -> jax.Array:
  """Resizes a `[1 + h*w, D]` ViT position table (class row first) to a `grid` of patches.

  The class row is kept; the square patch part is resized with torch's bicubic.
  """
  old_side = round((table.shape[0] - 1) ** 0.5)
  if old_side * old_side != table.shape[0] - 1:
    raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
  if tuple(grid) == (old_side, old_side):
    return table
  patches = table[1:].reshape(old_side, old_side, -1)
  patches = resize(patches, tuple(grid), mode="bicubic", align_corners=align_corners)
  return jnp.concatenate([table[:1], patches.reshape(-1, table.shape[-1])], axis=0)


class CLIPVisionEmbeddings(nn.Module):
  """HF `CLIPVisionEmbeddings`: `[cls, patches] + positions`.

  Returns `([B, 1 + h*w, D], (h, w))` for images `[B, H, W, C]`, h = H // patch_size.
  """

  hidden_size: int
  patch_size: int
  image_size: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    batch, height, width, channels = pixel_values.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f"CLIPVisionEmbeddings: image {height}x{width} is not a multiple of the "
                       f"patch size {self.patch_size}")
    patches = Conv2d(self.hidden_size, self.patch_size, stride=self.patch_size, use_bias=False,
                     in_features=channels, kernel_axes=(None, "vision_embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision,
                     name="patch_embedding")(pixel_values)
    grid = patches.shape[1:3]
    patches = patches.reshape(batch, -1, self.hidden_size)
    class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                        ("vision_embed",)),
        (self.hidden_size,), self.param_dtype)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    position_table = nn.Embed(  # the whole table is used: no lookup
        num_positions, self.hidden_size, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    (None, "vision_embed")),
        name="position_embedding").embedding
    positions = resize_position_table(position_table, grid)
    dtype = patches.dtype
    class_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, self.hidden_size))
    embeddings = jnp.concatenate([class_tokens, patches], axis=1) + positions.astype(dtype)
    return embeddings, tuple(grid)


class CLIPAttention(nn.Module):
  """HF `CLIPAttention`: multi-head self-attention with biased q/k/v/out projections.

  `[B, T, D]` -> `[B, T, D]`, no mask. `attention_implementation` is passed to
  `jax.nn.dot_product_attention` (None: XLA; "cudnn": cuDNN flash attention on GPU).
  """

  hidden_size: int
  num_heads: int
  attention_implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    batch, length, _ = hidden_states.shape
    head_dim = self.hidden_size // self.num_heads
    dense = lambda name, axes: Linear(  # noqa: E731
        self.hidden_size, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, name=name)
    split = lambda x: x.reshape(batch, length, self.num_heads, head_dim)  # noqa: E731
    query = split(dense("q_proj", ("vision_embed", "heads"))(hidden_states))
    key = split(dense("k_proj", ("vision_embed", "heads"))(hidden_states))
    value = split(dense("v_proj", ("vision_embed", "heads"))(hidden_states))
    heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
    query, key, value = (sharding.constrain(x, heads_axes) for x in (query, key, value))
    attended = jax.nn.dot_product_attention(query, key, value,
                                            implementation=self.attention_implementation)
    attended = attended.reshape(batch, length, self.hidden_size)
    return dense("out_proj", ("heads", "vision_embed"))(attended)


class CLIPMLP(nn.Module):
  """HF `CLIPMLP`: fc1 -> activation -> fc2."""

  hidden_size: int
  mlp_dim: int
  activation: str = "quick_gelu"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = Linear(self.mlp_dim, kernel_axes=("vision_embed", "mlp"), name="fc1", **kw)(x)
    x = sharding.constrain(x, ("activation_batch", "activation_length", "activation_heads"))
    x = ACTIVATIONS[self.activation](x)
    return Linear(self.hidden_size, kernel_axes=("mlp", "vision_embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
  """HF `CLIPEncoderLayer`: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

  hidden_size: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    def norm(name):
      return LayerNorm(epsilon=self.layer_norm_eps, axis_name="vision_embed", dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    attended = CLIPAttention(self.hidden_size, self.num_heads, self.attention_implementation,
                             name="self_attn", **kw)(norm("layer_norm1")(hidden_states))
    hidden_states = hidden_states + attended
    transformed = CLIPMLP(self.hidden_size, self.mlp_dim, self.activation, name="mlp",
                          **kw)(norm("layer_norm2")(hidden_states))
    hidden_states = hidden_states + transformed
    return sharding.constrain(hidden_states, ("activation_batch", "activation_length",
                                              "activation_embed"))


class CLIPEncoder(nn.Module):
  """HF `CLIPEncoder`: `num_layers` encoder layers, callable on a sub-range of them.

  The ViT-Adapter runs the layers in four groups with its own blocks in between, hence
  `__call__(x, start, stop)`.
  """

  num_layers: int
  hidden_size: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: str | None = None
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    layer_cls = remat_layer(CLIPEncoderLayer, self.remat_policy)
    self.layers = [
        layer_cls(self.hidden_size, self.num_heads, self.mlp_dim, self.activation,
                  self.layer_norm_eps, self.attention_implementation, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision)
        for _ in range(self.num_layers)
    ]

  def __call__(self, hidden_states: jax.Array, start: int = 0,
               stop: int | None = None) -> jax.Array:
    """Runs layers `start .. stop - 1` on `[B, T, D]`."""
    for layer in self.layers[start:stop]:
      hidden_states = layer(hidden_states)
    return hidden_states


class CLIPVisionTransformer(nn.Module):
  """HF `CLIPVisionTransformer` without the pooler: returns the last hidden state.

  Attributes (from the config's `vision_encoder` section):
    image_size: side of the images the position table was trained for.
    patch_size, hidden_size, num_layers, num_heads, mlp_dim, activation, layer_norm_eps.
    attention_implementation: see `CLIPAttention`.
    remat_policy: None, or a `jax.checkpoint_policies` name to rematerialize each layer.
  """

  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: str | None = None
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @classmethod
  def from_config(cls, model_config: Any, **attributes) -> "CLIPVisionTransformer":
    """Builds the ViT from a model config (`config.model`): its `vision_encoder` section."""
    vision = model_config.vision_encoder
    return cls(image_size=vision.image_size, patch_size=vision.patch_size,
               hidden_size=vision.hidden_size, num_layers=vision.num_layers,
               num_heads=vision.num_heads, mlp_dim=vision.mlp_dim,
               activation=vision.activation, layer_norm_eps=vision.layer_norm_eps,
               **attributes)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.embeddings = CLIPVisionEmbeddings(self.hidden_size, self.patch_size, self.image_size,
                                           **kw)
    self.pre_layrnorm = LayerNorm(epsilon=self.layer_norm_eps, axis_name="vision_embed",
                                  dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = CLIPEncoder(self.num_layers, self.hidden_size, self.num_heads, self.mlp_dim,
                               self.activation, self.layer_norm_eps,
                               self.attention_implementation, self.remat_policy, **kw)

  def embed(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """`[B, H, W, C]` -> (`pre_layrnorm(embeddings)` `[B, 1 + h*w, D]`, (h, w))."""
    if pixel_values.ndim != 4:
      raise ValueError(f"{type(self).__name__}: pixel_values must be [B, H, W, C], got "
                       f"{pixel_values.shape}")
    embeddings, grid = self.embeddings(pixel_values)
    return self.pre_layrnorm(embeddings), grid

  def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
    """Normalized images `[B, H, W, C]` -> `{"last_hidden_state": [B, 1 + h*w, D]}`."""
    hidden_states, _ = self.embed(pixel_values)
    return {"last_hidden_state": self.encoder(hidden_states)}
