"""Llama (Vicuna-13B in MM-Interleaved) with the multi-modal feature synchronizer.

Mirrors Hugging Face's `LlamaModel` / `LlamaForCausalLM` and the release's
`mm_interleaved/models/decoders/modeling_llama_mmfs.py` (SPEC section 5):

  * RMSNorm, rotary position embeddings in Hugging Face's half-split layout (`rotate_half`),
    computed in float32; SwiGLU MLP; multi-head attention with optional grouped KV heads,
    through `jax.nn.dot_product_attention` (`attention_implementation`: None lets JAX choose,
    "xla" is the plain fallback, "cudnn" is cuDNN flash attention on GPU).
  * In layers whose index is a multiple of `mmfs.layer_frequency`, between self-attention and
    MLP, the residual `tanh(gate) * MMFS(RMSNorm(h), RMSNorm(image features))`
    (`llama_cross_attn`), sampling every image the token may see.
  * An optional KV cache (`KVCache`): a call writes its tokens' keys and values at slot
    `cache.length` and attends to every valid slot up to each token's own. Prefill and
    decoding are the same call with chunks of different lengths.

Param names follow Hugging Face's (`embed_tokens`, `layers_3/self_attn/q_proj`, `norm`,
`lm_head`) and the release's (`layers_0/llama_cross_attn/{gate,norm1,norm2,attn}`), so
checkpoints map by the rule in `mmi_jax.convert.torch_names`.

Position ids default to `0 .. L-1` for every row, as Hugging Face's forward and the release's
training forward do; decoding with left padding passes positions counted over valid tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmi_jax import sharding
from mmi_jax.models.linear import Linear
from mmi_jax.models.mmfs import MMFS
from mmi_jax.models.norms import RMSNorm
from mmi_jax.models.remat import remat_layer

ACTIVATIONS = {"silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class MMFSLayerConfig:
  """The synchronizer inside the LLM (SPEC section 5; `config.model.llm.mmfs`).

  Attributes:
    value_dim: width of the image features it samples (the ViT width, 1024); also MMFS's
      attention width (`ratio * d_model` in the original).
    layer_frequency: layers with `index % layer_frequency == 0` have it.
    reference_point: where every token samples around, normalized (x, y).
    gate_init: initial `gate` (tanh(0) = 0: the layer starts as the plain LLM).
    Others: see `mmi_jax.models.mmfs.MMFS`.
  """

  value_dim: int = 1024
  layer_frequency: int = 4
  num_heads: int = 16
  num_points: int = 8
  scale_sizes: tuple[int, ...] = (32, 16, 8)
  base_spatial_shape: int = 16
  offset_init_magnitude: float = 3.0
  max_images: int = 50
  reference_point: tuple[float, float] = (0.5, 0.5)
  gate_init: float = 0.0
  kernel_init_std: float | None = 0.02


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama hyper-parameters (Hugging Face's `LlamaConfig` fields, mmi_jax names).

  Attributes:
    head_dim: None: `hidden_size // num_heads`.
    rope_scaling_factor: linear RoPE scaling (positions divided by it); 1.0 is plain RoPE.
    mmfs: None builds the plain Llama (no synchronizer).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  activation: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 1.0
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  mmfs: MMFSLayerConfig | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Llama: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"Llama: hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Llama: activation {self.activation!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    if self.mmfs is not None and self.mmfs.layer_frequency < 1:
      raise ValueError(f"Llama: mmfs.layer_frequency must be >= 1, got "
                       f"{self.mmfs.layer_frequency}")

  @property
  def attention_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def has_mmfs(self, layer: int) -> bool:
    """Whether layer `layer` has the synchronizer."""
    return self.mmfs is not None and layer % self.mmfs.layer_frequency == 0

  @property
  def mmfs_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.has_mmfs(i))

  @classmethod
  def from_config(cls, model_config: Any) -> "LlamaConfig":
    """From an mmi_jax model config (`config.model`): `llm`, `tokens` and `vision_encoder`."""
    llm = model_config.llm
    known = {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "activation",
             "rms_norm_eps", "rope_theta", "max_position_embeddings", "mmfs", "head_dim",
             "initializer_range"}
    unknown = set(llm.keys()) - known
    if unknown:
      raise ValueError(f"config.model.llm: unknown keys {sorted(unknown)}")
    mmfs_fields = {field.name for field in dataclasses.fields(MMFSLayerConfig)}
    unknown = set(llm.mmfs.keys()) - mmfs_fields
    if unknown:
      raise ValueError(f"config.model.llm.mmfs: unknown keys {sorted(unknown)}")
    mmfs = dict(llm.mmfs)
    mmfs.update(scale_sizes=tuple(mmfs["scale_sizes"]),
                reference_point=tuple(mmfs["reference_point"]),
                value_dim=mmfs.get("value_dim", model_config.vision_encoder.hidden_size))
    return cls(vocab_size=model_config.tokens.vocab_size, hidden_size=llm.hidden_size,
               num_layers=llm.num_layers, num_heads=llm.num_heads,
               num_kv_heads=llm.num_kv_heads, mlp_dim=llm.mlp_dim,
               head_dim=llm.get("head_dim"), activation=llm.activation,
               rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
               max_position_embeddings=llm.max_position_embeddings,
               initializer_range=llm.get("initializer_range", 0.02),
               mmfs=MMFSLayerConfig(**mmfs))


# --------------------------------------------------------------------------------------------
# KV cache.


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `max_length` token slots.

  Attributes:
    keys, values: one `[B, max_length, kv_heads, head_dim]` array per layer (keys after RoPE).
    key_valid: `[B, max_length]` bool, True for slots holding a real (non-padding) token.
    length: int32 scalar, the number of slots written so far (the same for every row; padding
      inside a row is handled by `key_valid`).
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  key_valid: jax.Array
  length: jax.Array

  @classmethod
  def empty(cls, config: LlamaConfig, batch: int, max_length: int,
            dtype: Any = jnp.float32) -> "KVCache":
    shape = (batch, max_length, config.num_kv_heads, config.attention_head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
               key_valid=jnp.zeros((batch, max_length), bool),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.key_valid.shape[1]


# Logical axes of per-head activations and cached keys/values [B, L, heads, head_dim].
HEAD_AXES = ("activation_batch", None, "activation_heads", None)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings.


def rotary_tables(positions: jax.Array, head_dim: int, theta: float,
                  scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Hugging Face's cos/sin tables in float32: `[B, L, head_dim]` each.

  `inv_freq = 1 / theta ** (arange(0, d, 2) / d)`, angles `position * inv_freq`, repeated for
  both halves (`cat(freqs, freqs)`).
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  angles = (positions.astype(jnp.float32) / scaling_factor)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """`x * cos + rotate_half(x) * sin` in float32, for `x [B, L, heads, head_dim]`."""
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Layers.


def _llama_linear(module: nn.Module, features: int, name: str, axes: tuple[str, str],
                  use_bias: bool) -> Linear:
  """A projection of `module` (attention or MLP) initialised as Hugging Face's Llama does."""
  return Linear(features, kernel_axes=axes, use_bias=use_bias,
                kernel_init=nn.initializers.normal(module.config.initializer_range),
                bias_init=nn.initializers.zeros, dtype=module.dtype,
                param_dtype=module.param_dtype, precision=module.precision, name=name)


class LlamaAttention(nn.Module):
  """Hugging Face's `LlamaAttention`: RoPE, grouped KV heads, optional KV cache.

  `__call__(hidden [B, L, D], cos, sin [B, L, head_dim], mask [B, 1, L, S], layer_cache,
  cache_index)` returns `(out [B, L, D], (keys, values))`; `layer_cache` is None (attend to
  the chunk itself, S = L) or this layer's `(keys, values)` `[B, S, kv_heads, head_dim]`, into
  which the chunk is written at slot `cache_index`.
  """

  config: LlamaConfig
  attention_implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, hidden_states, cos, sin, mask, layer_cache=None, cache_index=None):
    config = self.config
    batch, length, _ = hidden_states.shape
    head_dim = config.attention_head_dim
    dense = lambda features, name, axes: _llama_linear(  # noqa: E731
        self, features, name, axes, config.attention_bias)
    query = dense(config.num_heads * head_dim, "q_proj", ("embed", "heads"))(hidden_states)
    key = dense(config.num_kv_heads * head_dim, "k_proj", ("embed", "heads"))(hidden_states)
    value = dense(config.num_kv_heads * head_dim, "v_proj", ("embed", "heads"))(hidden_states)
    query = apply_rotary(query.reshape(batch, length, config.num_heads, head_dim), cos, sin)
    key = apply_rotary(key.reshape(batch, length, config.num_kv_heads, head_dim), cos, sin)
    value = value.reshape(batch, length, config.num_kv_heads, head_dim)
    query = sharding.constrain(query, HEAD_AXES)

    if layer_cache is not None:
      cached_keys, cached_values = layer_cache
      start = (0, cache_index, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), start)
      value = jax.lax.dynamic_update_slice(cached_values, value.astype(cached_values.dtype),
                                           start)
    key, value = sharding.constrain(key, HEAD_AXES), sharding.constrain(value, HEAD_AXES)
    dtype = query.dtype
    attended = jax.nn.dot_product_attention(query, key.astype(dtype), value.astype(dtype),
                                            mask=mask,
                                            implementation=self.attention_implementation)
    attended = attended.reshape(batch, length, config.num_heads * head_dim)
    output = dense(config.hidden_size, "o_proj", ("heads", "embed"))(attended)
    return output, (key, value)


class LlamaMLP(nn.Module):
  """Hugging Face's `LlamaMLP`: `down(act(gate(x)) * up(x))`."""

  config: LlamaConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    dense = lambda features, name, axes: _llama_linear(  # noqa: E731
        self, features, name, axes, config.mlp_bias)
    gate = dense(config.mlp_dim, "gate_proj", ("embed", "mlp"))(x)
    up = dense(config.mlp_dim, "up_proj", ("embed", "mlp"))(x)
    hidden = ACTIVATIONS[config.activation](gate) * up
    hidden = sharding.constrain(hidden, ("activation_batch", "activation_length",
                                         "activation_heads"))
    return dense(config.hidden_size, "down_proj", ("mlp", "embed"))(hidden)


class MMFSCrossAttention(nn.Module):
  """The release's `LlamaMMFSAttention`: `tanh(gate) * MMFS(norm1(h), norm2(features))`.

  `project_values(features [B, N, S, value_dim])` normalizes and projects the image features
  once (`[B, N, S, heads, head_dim]`); `__call__(hidden [B, L, D], projected, image_mask
  [B, L, N])` returns the residual `[B, L, D]` (without adding it).
  """

  config: LlamaConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    config, mmfs = self.config, self.config.mmfs
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.gate = self.param("gate", nn.with_logical_partitioning(
        nn.initializers.constant(mmfs.gate_init), (None,)), (1,), self.param_dtype)
    self.norm1 = RMSNorm(config.rms_norm_eps, "embed", **kw)
    self.norm2 = RMSNorm(config.rms_norm_eps, "vision_embed", **kw)
    self.attn = MMFS(
        query_dim=config.hidden_size, attention_dim=mmfs.value_dim,
        output_dim=config.hidden_size, scale_sizes=tuple(mmfs.scale_sizes),
        base_spatial_shape=mmfs.base_spatial_shape, num_heads=mmfs.num_heads,
        num_points=mmfs.num_points, offset_init_magnitude=mmfs.offset_init_magnitude,
        max_images=mmfs.max_images, kernel_init_std=mmfs.kernel_init_std,
        precision=self.precision, **kw)

  def project_values(self, image_features: jax.Array) -> jax.Array:
    return self.attn.project_values(self.norm2(image_features))

  def __call__(self, hidden_states, projected_values, image_mask):
    batch, length, _ = hidden_states.shape
    reference = jnp.broadcast_to(jnp.asarray(self.config.mmfs.reference_point, jnp.float32),
                                 (1, length, 2))
    attended = self.attn.attend(self.norm1(hidden_states), reference, projected_values,
                                image_mask)
    return attended * jnp.tanh(self.gate.astype(attended.dtype))


class LlamaDecoderLayer(nn.Module):
  """Hugging Face's `LlamaDecoderLayer`, with the release's MMFS residual where configured.

  `__call__(hidden, cos, sin, mask, layer_cache, cache_index, projected_values, image_mask)`
  -> `(hidden, (keys, values))`. The MMFS arguments are ignored (and may be None) in layers
  without the synchronizer; in layers with it, `projected_values` None skips it.
  """

  config: LlamaConfig
  layer_index: int
  attention_implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    config = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.input_layernorm = RMSNorm(config.rms_norm_eps, "embed", **kw)
    self.self_attn = LlamaAttention(config, self.attention_implementation,
                                    precision=self.precision, **kw)
    if config.has_mmfs(self.layer_index):
      self.llama_cross_attn = MMFSCrossAttention(config, precision=self.precision, **kw)
    self.post_attention_layernorm = RMSNorm(config.rms_norm_eps, "embed", **kw)
    self.mlp = LlamaMLP(config, precision=self.precision, **kw)

  def project_values(self, image_features: jax.Array) -> jax.Array:
    return self.llama_cross_attn.project_values(image_features)

  def __call__(self, hidden_states, cos, sin, mask, layer_cache=None, cache_index=None,
               projected_values=None, image_mask=None):
    attended, new_cache = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask,
                                         layer_cache, cache_index)
    hidden_states = hidden_states + attended
    if self.config.has_mmfs(self.layer_index) and projected_values is not None:
      hidden_states = hidden_states + self.llama_cross_attn(
          hidden_states, projected_values, image_mask).astype(hidden_states.dtype)
    hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
    hidden_states = sharding.constrain(hidden_states, ("activation_batch", "activation_length",
                                                       "activation_embed"))
    return hidden_states, new_cache


# --------------------------------------------------------------------------------------------
# The decoder.


def attention_mask_4d(attention_mask: jax.Array, cache: KVCache | None) -> tuple[jax.Array, Any]:
  """The boolean self-attention mask `[B, 1, L, S]` and the updated `key_valid`.

  Without a cache, S = L: causal, and keys must be valid. With one, the chunk occupies slots
  `length .. length + L - 1`, and slot j is visible to the chunk's token i iff
  `j <= length + i` and j holds a valid token.
  """
  length = attention_mask.shape[1]
  valid = attention_mask.astype(bool)
  if cache is None:
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None, None] & valid[:, None, None, :], None
  key_valid = jax.lax.dynamic_update_slice(cache.key_valid, valid, (0, cache.length))
  query_slots = cache.length + jnp.arange(length)
  causal = jnp.arange(cache.max_length)[None, :] <= query_slots[:, None]  # [L, S]
  return causal[None, None] & key_valid[:, None, None, :], key_valid


class LlamaModel(nn.Module):
  """Hugging Face's `LlamaModel` (the release's `mm_decoder`), with MMFS layers.

  Methods:
    embed(ids [B, L]) -> `[B, L, D]` token embeddings.
    project_image_features(features [B, N, S, value_dim]) -> one `[B, N, S, H, hd]` per MMFS
      layer (normalized and projected once, reusable across decoding steps).
    __call__(inputs_embeds, attention_mask, positions, ...) -> `(hidden [B, L, D], cache)`,
      the final RMSNorm applied.
  """

  config: LlamaConfig
  attention_implementation: str | None = None
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    config = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(
        config.vocab_size, config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), ("vocab", "embed")))
    layer_cls = remat_layer(LlamaDecoderLayer, self.remat_policy)
    self.layers = [layer_cls(config, index, self.attention_implementation,
                             precision=self.precision, **kw)
                   for index in range(config.num_layers)]
    self.norm = RMSNorm(config.rms_norm_eps, "embed", **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids)

  def project_image_features(self, image_features: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(self.layers[i].project_values(image_features)
                 for i in self.config.mmfs_layers)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               projected_values: tuple[jax.Array, ...] | None = None,
               image_mask: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on a chunk of `L` tokens.

    Args:
      inputs_embeds: `[B, L, D]`.
      attention_mask: `[B, L]`, 1 for real tokens, 0 for padding (keys never attended);
        None: all ones.
      positions: `[B, L]` RoPE positions; None: `cache.length + 0 .. L-1` for every row.
      projected_values: the per-sequence image features `[B, N, S, value_dim]` passed through
        `project_image_features`; None: MMFS layers are skipped, as the release does without
        images.
      image_mask: `[B, L, N]`, which images each token may see.
      cache: None, or a `KVCache` to write this chunk into and attend through.
    Returns:
      `(hidden_states [B, L, D], updated cache or None)`.
    """
    config = self.config
    batch, length, _ = inputs_embeds.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      start = 0 if cache is None else cache.length
      positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    if projected_values is not None:
      if image_mask is None:
        raise ValueError("LlamaModel: image features need an image_mask [B, L, N]")
      if len(projected_values) != len(config.mmfs_layers):
        raise ValueError(f"LlamaModel: {len(projected_values)} projected value arrays for "
                         f"{len(config.mmfs_layers)} MMFS layers")
    mask, key_valid = attention_mask_4d(attention_mask, cache)
    cos, sin = rotary_tables(positions, config.attention_head_dim, config.rope_theta,
                             config.rope_scaling_factor)

    hidden_states = sharding.constrain(inputs_embeds, ("activation_batch", "activation_length",
                                                       "activation_embed"))
    new_keys, new_values = [], []
    mmfs_index = {layer: i for i, layer in enumerate(config.mmfs_layers)}
    for index, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
      layer_values = None
      if projected_values is not None and index in mmfs_index:
        layer_values = projected_values[mmfs_index[index]]
      hidden_states, (keys, values) = layer(
          hidden_states, cos, sin, mask, layer_cache, None if cache is None else cache.length,
          layer_values, image_mask)
      new_keys.append(keys)
      new_values.append(values)
    hidden_states = self.norm(hidden_states)
    if cache is None:
      return hidden_states, None
    return hidden_states, KVCache(keys=tuple(new_keys), values=tuple(new_values),
                                  key_valid=key_valid, length=cache.length + length)


class LlamaForCausalLM(nn.Module):
  """Hugging Face's `LlamaForCausalLM`: `LlamaModel` (as `model`) and `lm_head`.

  `__call__(input_ids [B, L], attention_mask [B, L] = None, positions = None, cache = None)`
  returns `logits [B, L, vocab]` (float32), or `(logits, cache)` when a cache is given.
  """

  config: LlamaConfig
  attention_implementation: str | None = None
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    self.model = LlamaModel(self.config, self.attention_implementation, self.remat_policy,
                            self.dtype, self.param_dtype, self.precision)
    if not self.config.tie_word_embeddings:
      self.lm_head = Linear(self.config.vocab_size, kernel_axes=("embed", "vocab"),
                            use_bias=False,
                            kernel_init=nn.initializers.normal(self.config.initializer_range),
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            precision=self.precision)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    hidden_states, cache_out = self.model(self.model.embed(input_ids), attention_mask,
                                          positions, cache=cache)
    if self.config.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(hidden_states)
    else:
      logits = self.lm_head(hidden_states)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, cache_out)


__all__ = ["KVCache", "LlamaAttention", "LlamaConfig", "LlamaDecoderLayer", "LlamaForCausalLM",
           "LlamaMLP", "LlamaModel", "MMFSCrossAttention", "MMFSLayerConfig", "apply_rotary",
           "attention_mask_4d", "rotary_tables"]
