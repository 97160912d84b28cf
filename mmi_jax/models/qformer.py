"""BLIP-2's Q-Former used as a perceiver resampler: learned queries cross-attend to features.

Mirrors `transformers.Blip2QFormerModel` called with `query_embeds` only (no text), plus the
release's `PerceiverResampler` (`mm_interleaved/models/decoders/perceiver.py`) that owns the
queries. The release patches the attention with qk-normalization (`qk_normalization=True` in
the visual tokenizer): a LayerNorm over each head's `head_dim` on the queries and keys, in
self- and cross-attention alike (`blip2_qknorm_monkey_patch.py`); here it is a setting.

Param names follow Hugging Face's (`layernorm`, `encoder/layer_3/attention/attention/query`,
`.../crossattention/output/LayerNorm`, `intermediate_query/dense`, `output_query/dense`), so a
`Blip2QFormerModel` state dict maps one-to-one. Layers whose index is a multiple of
`cross_attention_frequency` have cross-attention.

Dropout (hidden states and attention probabilities) is active when `deterministic=False` and
draws from the `"dropout"` rng.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax import sharding
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """The Q-Former's hyper-parameters (a config's `qformer` section; HF `Blip2QFormerConfig`)."""

  num_queries: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  cross_attention_frequency: int = 2
  qk_normalization: bool = False
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1
  init_std: float = 0.02

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any]) -> "QFormerConfig":
    """From a config section (`model.visual_tokenizer.qformer`, `model.image_decoder.qformer`)
    with exactly this class's field names."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = set(section.keys()) - names
    if unknown:
      raise ValueError(f"QFormerConfig: unknown keys {sorted(unknown)}")
    return cls(**{key: section[key] for key in section.keys()})


class _QFormerModule(nn.Module):
  """Shared attributes and constructors of the Q-Former's modules."""

  config: QFormerConfig
  encoder_axis: str = "vision_embed"  # logical name of the encoder features' width
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  def dense(self, features: int, axes: tuple[str | None, str | None], name: str) -> Linear:
    """HF's `nn.Linear` with BLIP-2's init: N(0, init_std) weight, zero bias."""
    return Linear(features, kernel_axes=axes,
                  kernel_init=nn.initializers.normal(self.config.init_std),
                  bias_init=nn.initializers.zeros, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision, name=name)

  def layer_norm(self, name: str, axis_name: str | None = "qformer_embed") -> nn.LayerNorm:
    return LayerNorm(epsilon=self.config.layer_norm_eps, axis_name=axis_name, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

  def child_settings(self) -> dict[str, Any]:
    return dict(config=self.config, encoder_axis=self.encoder_axis, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision)


class QFormerMultiHeadAttention(_QFormerModule):
  """`Blip2QFormerMultiHeadAttention` with the release's optional per-head q/k LayerNorms.

  Self-attention over `hidden_states [B, Lq, D]`, or cross-attention into
  `encoder_hidden_states [B, S, E]` with an optional `encoder_attention_mask [B, S]` (1/True =
  attend). Returns the heads' outputs concatenated, `[B, Lq, D]`.
  """

  @nn.compact
  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
               encoder_attention_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cross = encoder_hidden_states is not None
    source = encoder_hidden_states if cross else hidden_states
    source_axis = self.encoder_axis if cross else "qformer_embed"
    width, num_heads = self.config.hidden_size, self.config.num_heads
    head_dim = width // num_heads

    def split_heads(x):
      return x.reshape(*x.shape[:2], num_heads, head_dim)

    query = split_heads(self.dense(width, ("qformer_embed", "heads"), "query")(hidden_states))
    key = split_heads(self.dense(width, (source_axis, "heads"), "key")(source))
    value = split_heads(self.dense(width, (source_axis, "heads"), "value")(source))
    if self.config.qk_normalization:
      query = self.layer_norm("q_norm", axis_name=None)(query)
      key = self.layer_norm("k_norm", axis_name=None)(key)

    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=self.precision,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
    if encoder_attention_mask is not None:
      if not cross or encoder_attention_mask.shape != source.shape[:2]:
        raise ValueError(f"{type(self).__name__}: encoder_attention_mask must be "
                         f"{source.shape[:2]} with encoder_hidden_states, got "
                         f"{encoder_attention_mask.shape}")
      keep = encoder_attention_mask.astype(bool)[:, None, None, :]
      scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    probs = nn.Dropout(self.config.attention_dropout)(probs, deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs, value, precision=self.precision)
    return attended.reshape(*hidden_states.shape[:2], width)


class QFormerOutput(_QFormerModule):
  """`Blip2QFormerSelfOutput` / `Blip2QFormerOutput`: `LayerNorm(dropout(dense(x)) + residual)`."""

  input_axis: str = "heads"

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool = True):
    x = self.dense(self.config.hidden_size, (self.input_axis, "qformer_embed"), "dense")(x)
    x = nn.Dropout(self.config.dropout)(x, deterministic=deterministic)
    return self.layer_norm("LayerNorm")(x + residual)


class QFormerAttention(_QFormerModule):
  """`Blip2QFormerAttention`: multi-head attention, then the residual output block."""

  @nn.compact
  def __call__(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None,
               deterministic: bool = True) -> jax.Array:
    attended = QFormerMultiHeadAttention(**self.child_settings(), name="attention")(
        hidden_states, encoder_hidden_states, encoder_attention_mask, deterministic)
    return QFormerOutput(**self.child_settings(), name="output")(attended, hidden_states,
                                                                 deterministic)


class QFormerIntermediate(_QFormerModule):
  """`Blip2QFormerIntermediate`: dense to `mlp_dim`, then exact GELU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.dense(self.config.mlp_dim, ("qformer_embed", "mlp"), "dense")(x)
    x = sharding.constrain(x, ("activation_batch", "activation_length", "activation_heads"))
    return jax.nn.gelu(x, approximate=False)


class QFormerLayer(_QFormerModule):
  """`Blip2QFormerLayer` on query tokens only: self-attention, cross-attention when
  `has_cross_attention`, and the query MLP (`intermediate_query`, `output_query`)."""

  has_cross_attention: bool = True

  @nn.compact
  def __call__(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None,
               deterministic: bool = True) -> jax.Array:
    settings = self.child_settings()
    hidden_states = QFormerAttention(**settings, name="attention")(
        hidden_states, deterministic=deterministic)
    if self.has_cross_attention:
      hidden_states = QFormerAttention(**settings, name="crossattention")(
          hidden_states, encoder_hidden_states, encoder_attention_mask, deterministic)
    intermediate = QFormerIntermediate(**settings, name="intermediate_query")(hidden_states)
    hidden_states = QFormerOutput(**settings, input_axis="mlp", name="output_query")(
        intermediate, hidden_states, deterministic)
    return sharding.constrain(hidden_states, ("activation_batch", "activation_length",
                                              "activation_embed"))


class QFormerEncoder(_QFormerModule):
  """`Blip2QFormerEncoder`: the stack of layers (`layer_0`, `layer_1`, ...)."""

  @nn.compact
  def __call__(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None,
               deterministic: bool = True) -> jax.Array:
    for index in range(self.config.num_layers):
      has_cross = index % self.config.cross_attention_frequency == 0
      hidden_states = QFormerLayer(**self.child_settings(), has_cross_attention=has_cross,
                                   name=f"layer_{index}")(
          hidden_states, encoder_hidden_states, encoder_attention_mask, deterministic)
    return hidden_states


class Blip2QFormer(_QFormerModule):
  """`Blip2QFormerModel(query_embeds=..., encoder_hidden_states=...)`.

  `query_embeds [B, Q, D]`, `encoder_hidden_states [B, S, E]` -> `[B, Q, D]`: LayerNorm and
  dropout on the queries, then the layers. No final LayerNorm (there is none in BLIP-2).
  """

  @nn.compact
  def __call__(self, query_embeds: jax.Array, encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    hidden_states = self.layer_norm("layernorm")(query_embeds)
    hidden_states = nn.Dropout(self.config.dropout)(hidden_states, deterministic=deterministic)
    return QFormerEncoder(**self.child_settings(), name="encoder")(
        hidden_states, encoder_hidden_states, encoder_attention_mask, deterministic)


class PerceiverResampler(_QFormerModule):
  """The release's `PerceiverResampler`: `num_queries` learned queries through a Q-Former.

  `encoder_hidden_states [B, S, E]` (+ optional mask `[B, S]`) -> `[B, num_queries, D]`.
  Params: `queries [1, Q, D]` (N(0, init_std)) and `blip2qformer/...`.
  """

  @nn.compact
  def __call__(self, encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    if encoder_hidden_states.ndim != 3:
      raise ValueError(f"PerceiverResampler: encoder_hidden_states must be [B, S, E], got "
                       f"{encoder_hidden_states.shape}")
    queries = self.param(
        "queries", nn.with_logical_partitioning(nn.initializers.normal(self.config.init_std),
                                                (None, None, "qformer_embed")),
        (1, self.config.num_queries, self.config.hidden_size), self.param_dtype)
    batch = encoder_hidden_states.shape[0]
    dtype = self.dtype or encoder_hidden_states.dtype
    queries = jnp.broadcast_to(queries.astype(dtype), (batch,) + queries.shape[1:])
    return Blip2QFormer(**self.child_settings(), name="blip2qformer")(
        queries, encoder_hidden_states, encoder_attention_mask, deterministic)
