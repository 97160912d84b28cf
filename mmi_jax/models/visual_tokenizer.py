"""The visual tokenizer: images -> 64 LLM-width tokens each, plus the multi-scale maps MMFS
samples (SPEC section 4).

Mirrors `mm_interleaved/models/encoders/visual_tokenizer.py::VisualTokenizer`:

  1. pixels in [0, 1] are normalized with CLIP's mean and std;
  2. the CLIP ViT-L/14 + ViT-Adapter encoder gives the last hidden state `[B, 1 + g*g, E]` and
     4 multi-scale maps;
  3. a fixed 2-D sin-cos table (`pos_embed`, a frozen param `[1 + G*G, E]`, zero row for cls)
     is added to every map, resized to its size with PyTorch's bicubic (a = -0.75,
     `align_corners=False`);
  4. Q-Former input = `post_ln(pos_ln(pos_proj(last_hidden)) + pos_embed)`;
  5. the perceiver resampler (BLIP-2 Q-Former with qk-normalization, learned queries) and
     `proj` (init N(0, 1e-3), zero bias) give `vis_embed [B, num_queries, llm_width]`.

Param names follow the release (`pos_proj`, `pos_ln`, `pos_embed`, `perceiver_resampler/...`,
`post_ln`, `proj`), except that the encoder's params sit directly under `encoder/` where the
release nests them in `encoder.vision_model.` (Hugging Face's model wrapper);
`mmi_jax.convert.release` maps that prefix.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmi_jax.models.clip_vision import resize_position_table
from mmi_jax.models.linear import Linear
from mmi_jax.models.norms import LayerNorm
from mmi_jax.models.qformer import PerceiverResampler, QFormerConfig
from mmi_jax.models.sincos import sincos_2d
from mmi_jax.models.vit_adapter import CLIPViTAdapter

# Params the release does not train: the CLIP ViT trunk (`freeze_vit=True`) and the fixed
# position table. Everything else (adapter, perceiver, projections, norms) is trained.
FROZEN_VIT_PATTERNS = (r"^encoder/(embeddings|pre_layrnorm|encoder)/",)
ALWAYS_FROZEN_PATTERNS = (r"^pos_embed$",)


class VisualTokenizer(nn.Module):
  """Images `[B, H, W, 3]` in [0, 1] -> visual tokens and multi-scale features.

  Attributes:
    encoder: the `CLIPViTAdapter` (its attributes carry the vision config).
    qformer: the perceiver resampler's settings.
    output_dim: the LLM width (5120 for Vicuna-13B).
    pos_grid_size: side G of the sin-cos table (16).
    layer_norm_eps: of `pos_ln` and `post_ln` (1e-6).
    proj_init_std: init std of `proj` (1e-3).
    pixel_mean, pixel_std: CLIP's normalization; `clip_normalize=False` skips it.
  """

  encoder: CLIPViTAdapter
  qformer: QFormerConfig
  output_dim: int
  pos_grid_size: int = 16
  layer_norm_eps: float = 1e-6
  proj_init_std: float = 1e-3
  pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  clip_normalize: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @classmethod
  def from_config(cls, model_config: Any, *, output_dim: int | None = None,
                  **attributes) -> "VisualTokenizer":
    """Builds the tokenizer from a model config (`config.model`).

    `attributes` may set `dtype`, `param_dtype`, `precision` (shared with the encoder),
    and the encoder's `remat_policy` and `attention_implementation`.
    """
    shared = {k: attributes.pop(k) for k in ("dtype", "param_dtype", "precision")
              if k in attributes}
    encoder_only = {k: attributes.pop(k) for k in ("remat_policy", "attention_implementation")
                    if k in attributes}
    vision = model_config.vision_encoder
    section = model_config.visual_tokenizer
    encoder = CLIPViTAdapter.from_config(model_config, **shared, **encoder_only)
    return cls(encoder=encoder, qformer=QFormerConfig.from_mapping(section.qformer),
               output_dim=model_config.llm.hidden_size if output_dim is None else output_dim,
               pos_grid_size=section.pos_grid_size, layer_norm_eps=section.layer_norm_eps,
               proj_init_std=section.proj_init_std, pixel_mean=tuple(vision.pixel_mean),
               pixel_std=tuple(vision.pixel_std), **shared, **attributes)

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, Any]:
    """Encodes images.

    Args:
      images: `[B, H, W, 3]` pixels in [0, 1] (already normalized if `clip_normalize` is off),
        at the encoder's `image_size`.
      deterministic: False enables the Q-Former's dropout (rng `"dropout"`).

    Returns:
      `vis_embed`: `[B, num_queries, output_dim]`, the image's tokens for the LLM;
      `image_embeds`: `[B, g*g, E]`, the last hidden state (without cls) plus positions;
      `multiscale_features`: the 4 encoder maps `[B, h_i, w_i, E]` plus positions.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VisualTokenizer: images must be [B, H, W, 3], got {images.shape}")
    width = self.encoder.hidden_size
    if self.clip_normalize:
      mean = jnp.asarray(self.pixel_mean, jnp.float32)
      std = jnp.asarray(self.pixel_std, jnp.float32)
      images = ((images.astype(jnp.float32) - mean) / std).astype(images.dtype)
    encoded = self.encoder(images)
    last_hidden = encoded["last_hidden_state"]

    table = jnp.asarray(sincos_2d(width, self.pos_grid_size, cls_token=True))
    pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
        lambda key, shape, dtype: table.astype(dtype), (None, "vision_embed")), table.shape,
                           self.param_dtype)
    multiscale = []
    for features in encoded["multiscale_features"]:
      _, height, map_width, _ = features.shape
      positions = resize_position_table(pos_embed, (height, map_width))[1:]
      multiscale.append(features + positions.reshape(height, map_width, width).astype(
          features.dtype))
    patch_side = round((last_hidden.shape[1] - 1) ** 0.5)
    positions = resize_position_table(pos_embed, (patch_side, patch_side))
    positions = positions.astype(last_hidden.dtype)

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    def norm(name):
      return LayerNorm(epsilon=self.layer_norm_eps, axis_name="vision_embed", dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    projected = Linear(width, kernel_axes=("vision_embed", "query_proj"), name="pos_proj",
                       **kw)(last_hidden)
    qformer_inputs = norm("post_ln")(norm("pos_ln")(projected) + positions)
    queries = PerceiverResampler(self.qformer, name="perceiver_resampler", **kw)(
        qformer_inputs, deterministic=deterministic)
    vis_embed = Linear(self.output_dim, kernel_axes=("qformer_embed", "embed"),
                       kernel_init=nn.initializers.normal(self.proj_init_std),
                       bias_init=nn.initializers.zeros, name="proj", **kw)(queries)
    return {"vis_embed": vis_embed, "image_embeds": (last_hidden + positions)[:, 1:],
            "multiscale_features": tuple(multiscale)}


def frozen_param_patterns(freeze_vit: bool = True) -> tuple[str, ...]:
  """Path patterns of the params the release does not train (for `mmi_jax.trainable`): the
  CLIP ViT trunk when `freeze_vit` (the release's default) and `pos_embed`. The adapter, the
  perceiver and `pos_proj`/`pos_ln`/`post_ln`/`proj` train."""
  return ALWAYS_FROZEN_PATTERNS + (FROZEN_VIT_PATTERNS if freeze_vit else ())
