"""Hugging Face checkpoints -> mmi_jax modules and params.

* `load_clip_vision(path)`: a `CLIPVisionModel` or full `CLIPModel` directory (config.json and
  safetensors or pytorch_model.bin, possibly sharded) -> `(CLIPVisionTransformer, params)`.
* `load_qformer(path)`: a `Blip2QFormerModel` directory -> `(Blip2QFormer, params)`; per-head
  q/k LayerNorms (the release's qk-normalization) are detected from the weights.
* `load_clip_trunk(path, abstract_encoder)`: the CLIP trunk's params for the ViT-Adapter
  encoder of the visual tokenizer (the public starting point of training).
* `load_llama(path)`: a `LlamaForCausalLM` directory -> `(LlamaForCausalLM, params)`,
  optionally with the vocabulary grown the way the release grew it (32000 -> 32002).
* `clip_vision_params(...)` / `qformer_params(...)`: the same conversions into a given abstract
  param tree, for composite models that embed these components.

Names map by the rule in `torch_names`; everything in the file under the component's prefix must
be used, except weights the model deliberately lacks (CLIP's `post_layernorm`, which
MM-Interleaved replaces by the identity, and the text tower of a full CLIPModel).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.convert import checkpoint_files
from mmi_jax.convert.torch_names import params_from_state_dict
from mmi_jax.models.clip_vision import (ACTIVATIONS, CLIPVisionTransformer,
                                        resize_position_table)
from mmi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from mmi_jax.models.qformer import Blip2QFormer, QFormerConfig
from mmi_jax.sharding import abstract_params

# Weights of a CLIP checkpoint that the vision trunk deliberately does not use.
CLIP_UNUSED = (
    r"^(vision_model\.)?post_layernorm\.",  # MM-Interleaved uses no post-LayerNorm
    r"^(vision_model\.)?embeddings\.position_ids$",  # a buffer of older checkpoints
    r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$",
)
# Text-input weights of a Q-Former (`use_qformer_text_input`); only queries are used.
QFORMER_UNUSED = (r"(^|\.)layer\.\d+\.intermediate\.", r"(^|\.)layer\.\d+\.output\.")


def _pretrained_config(path: str | os.PathLike):
  import transformers  # noqa: PLC0415

  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint "
                            "directory)")
  return transformers.AutoConfig.from_pretrained(str(path))


def clip_vision_attributes(vision_config: Any) -> dict[str, Any]:
  """`CLIPVisionTransformer` attributes from a `transformers.CLIPVisionConfig`."""
  if vision_config.hidden_act not in ACTIVATIONS:
    raise ValueError(f"CLIP hidden_act {vision_config.hidden_act!r} is not supported; "
                     f"supported: {sorted(ACTIVATIONS)}")
  if vision_config.hidden_size % vision_config.num_attention_heads:
    raise ValueError(f"CLIP hidden_size {vision_config.hidden_size} is not divisible by "
                     f"{vision_config.num_attention_heads} heads")
  return dict(image_size=vision_config.image_size, patch_size=vision_config.patch_size,
              hidden_size=vision_config.hidden_size,
              num_layers=vision_config.num_hidden_layers,
              num_heads=vision_config.num_attention_heads,
              mlp_dim=vision_config.intermediate_size, activation=vision_config.hidden_act,
              layer_norm_eps=vision_config.layer_norm_eps)


def clip_vision_prefix(tensors: Mapping[str, Any], path: Any = "checkpoint") -> str:
  """The prefix of the vision tower's keys: `vision_model.` (CLIPModel, and CLIPVisionModel
  saved by transformers 4) or none (CLIPVisionModel saved by transformers 5)."""
  for prefix in ("vision_model.", ""):
    if f"{prefix}embeddings.patch_embedding.weight" in tensors:
      return prefix
  raise ValueError(f"{path}: no CLIP vision weights (looked for "
                   "'vision_model.embeddings.patch_embedding.weight' and "
                   "'embeddings.patch_embedding.weight')")


def clip_vision_params(abstract: Any, tensors: Mapping[str, Any], prefix: str = "vision_model.",
                       *, ignore: tuple[str, ...] = CLIP_UNUSED,
                       source: str = "CLIP checkpoint") -> dict[str, Any]:
  """Converts CLIP vision weights (HF names under `prefix`) into the tree `abstract`."""
  return params_from_state_dict(abstract, tensors, prefix, ignore=ignore, source=source)


def load_clip_vision(path: str | os.PathLike, *, dtype: Any = None,
                     param_dtype: Any = jnp.float32,
                     **attributes) -> tuple[CLIPVisionTransformer, dict[str, Any]]:
  """Loads the vision tower of a Hugging Face CLIP checkpoint directory.

  Args:
    path: a `CLIPVisionModel` or `CLIPModel` directory saved with `save_pretrained` (or
      downloaded), holding config.json and safetensors or pytorch_model.bin weights.
    dtype: computation dtype of the module (None: the input's).
    param_dtype: dtype the params are converted to.
    **attributes: further `CLIPVisionTransformer` attributes (`remat_policy`,
      `attention_implementation`, ...).

  Returns:
    `(module, params)`: `module.apply({"params": params}, pixel_values)` takes normalized
    images `[B, H, W, 3]` and returns `{"last_hidden_state": [B, 1 + patches, width]}`, equal
    to Hugging Face's `CLIPVisionModel(...).last_hidden_state` (at other sizes, to its
    `interpolate_pos_encoding=True`).
  """
  config = _pretrained_config(path)
  vision_config = getattr(config, "vision_config", config)
  if vision_config.model_type != "clip_vision_model":
    raise ValueError(f"{path}: model_type {config.model_type!r} is not a CLIP model")
  module = CLIPVisionTransformer(**clip_vision_attributes(vision_config), dtype=dtype,
                                 param_dtype=param_dtype, **attributes)
  size = vision_config.image_size
  example = jax.ShapeDtypeStruct((1, size, size, vision_config.num_channels), jnp.float32)
  abstract = abstract_params(module, example)
  tensors = checkpoint_files.open_checkpoint(path)
  params = clip_vision_params(abstract, tensors, clip_vision_prefix(tensors, path),
                              source=f"CLIP checkpoint {path}")
  return module, jax.tree.map(jnp.asarray, params)


TRUNK_MODULES = ("embeddings", "pre_layrnorm", "encoder")


def load_clip_trunk(path: str | os.PathLike, abstract_encoder: Any) -> dict[str, Any]:
  """The ViT-trunk params of a Hugging Face CLIP checkpoint, for an encoder that embeds the
  trunk (`CLIPViTAdapter`, i.e. `visual_tokenizer_params["encoder"]`).

  Returns `{"embeddings": ..., "pre_layrnorm": ..., "encoder": ...}` to merge into freshly
  initialised params. When the checkpoint's position table is for another image size than the
  encoder's, it is resized as the release does at load time (bicubic, `align_corners=True`,
  class row kept).
  """
  tensors = checkpoint_files.open_checkpoint(path)
  prefix = clip_vision_prefix(tensors, path)
  trunk = nn.meta.unbox({name: abstract_encoder[name] for name in TRUNK_MODULES})
  table = trunk["embeddings"]["position_embedding"]["embedding"]
  file_rows = tensors[f"{prefix}embeddings.position_embedding.weight"].shape[0]
  # Convert the table at the checkpoint's size, then resize it to the encoder's.
  trunk["embeddings"]["position_embedding"]["embedding"] = jax.ShapeDtypeStruct(
      (file_rows, table.shape[1]), table.dtype)
  params = params_from_state_dict(trunk, tensors, prefix, ignore=CLIP_UNUSED,
                                  source=f"CLIP checkpoint {path}")
  if file_rows != table.shape[0]:
    side = round((table.shape[0] - 1) ** 0.5)
    resized = resize_position_table(jnp.asarray(
        params["embeddings"]["position_embedding"]["embedding"]), (side, side),
                                    align_corners=True)
    params["embeddings"]["position_embedding"]["embedding"] = np.asarray(resized, table.dtype)
  return params


def qformer_config(hf_config: Any, *, num_queries: int,
                   qk_normalization: bool = False) -> QFormerConfig:
  """A `QFormerConfig` from a `transformers.Blip2QFormerConfig`."""
  if hf_config.hidden_act != "gelu":
    raise ValueError(f"Q-Former hidden_act {hf_config.hidden_act!r} is not supported (gelu)")
  return QFormerConfig(
      num_queries=num_queries, hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
      mlp_dim=hf_config.intermediate_size,
      cross_attention_frequency=hf_config.cross_attention_frequency,
      qk_normalization=qk_normalization, layer_norm_eps=hf_config.layer_norm_eps,
      dropout=hf_config.hidden_dropout_prob,
      attention_dropout=hf_config.attention_probs_dropout_prob,
      init_std=hf_config.initializer_range)


def qformer_params(abstract: Any, tensors: Mapping[str, Any], prefix: str = "",
                   *, source: str = "Q-Former checkpoint") -> dict[str, Any]:
  """Converts `Blip2QFormerModel` weights (HF names under `prefix`) into the tree `abstract`."""
  return params_from_state_dict(abstract, tensors, prefix, ignore=QFORMER_UNUSED, source=source)


def load_qformer(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 num_queries: int = 32) -> tuple[Blip2QFormer, dict[str, Any]]:
  """Loads a `Blip2QFormerModel` directory as `Blip2QFormer`.

  `module.apply({"params": params}, query_embeds, encoder_hidden_states)` equals
  `Blip2QFormerModel(query_embeds=..., encoder_hidden_states=...).last_hidden_state`.
  Per-head q/k LayerNorm weights (`...attention.q_norm.weight`), as the release's patched
  Q-Former has, switch qk-normalization on.
  """
  hf_config = _pretrained_config(path)
  if hf_config.model_type != "blip_2_qformer":
    raise ValueError(f"{path}: model_type {hf_config.model_type!r} is not blip_2_qformer")
  tensors = checkpoint_files.open_checkpoint(path)
  qk_normalization = "encoder.layer.0.attention.attention.q_norm.weight" in tensors
  config = qformer_config(hf_config, num_queries=num_queries, qk_normalization=qk_normalization)
  module = Blip2QFormer(config, dtype=dtype, param_dtype=param_dtype)
  queries = jax.ShapeDtypeStruct((1, num_queries, config.hidden_size), jnp.float32)
  features = jax.ShapeDtypeStruct((1, 1, hf_config.encoder_hidden_size), jnp.float32)
  abstract = abstract_params(module, queries, features)
  params = qformer_params(abstract, tensors, source=f"Q-Former checkpoint {path}")
  return module, jax.tree.map(jnp.asarray, params)


# Buffers some Llama checkpoints carry (older transformers saved the RoPE frequencies).
LLAMA_UNUSED = (r"\.rotary_emb\.inv_freq$",)


def rope_settings(hf_config: Any) -> tuple[float, float]:
  """`(theta, linear scaling factor)` of a Hugging Face Llama config (transformers 4 or 5)."""
  parameters = getattr(hf_config, "rope_parameters", None)
  if parameters is None:  # transformers 4: rope_theta and rope_scaling
    parameters = dict(getattr(hf_config, "rope_scaling", None) or {})
    parameters.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  rope_type = parameters.get("rope_type", parameters.get("type", "default"))
  if rope_type == "default":
    return float(parameters["rope_theta"]), 1.0
  if rope_type == "linear":
    return float(parameters["rope_theta"]), float(parameters["factor"])
  raise NotImplementedError(f"Llama RoPE type {rope_type!r} is not implemented (only 'default' "
                            "and 'linear'; Vicuna and Llama 2 use 'default')")


def llama_config(hf_config: Any) -> LlamaConfig:
  """A `LlamaConfig` (without MMFS) from a `transformers.LlamaConfig`."""
  theta, factor = rope_settings(hf_config)
  return LlamaConfig(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
      num_kv_heads=getattr(hf_config, "num_key_value_heads", None)
      or hf_config.num_attention_heads,
      mlp_dim=hf_config.intermediate_size, head_dim=getattr(hf_config, "head_dim", None),
      activation=hf_config.hidden_act, rms_norm_eps=hf_config.rms_norm_eps, rope_theta=theta,
      rope_scaling_factor=factor, max_position_embeddings=hf_config.max_position_embeddings,
      attention_bias=bool(getattr(hf_config, "attention_bias", False)),
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      initializer_range=hf_config.initializer_range)


def grow_vocabulary(table: np.ndarray, rows: int, rng: jax.Array, stddev: float) -> np.ndarray:
  """`table [V, D]` with rows appended up to `rows`, drawn from N(0, stddev).

  This is what the release's `resize_token_embeddings(32002)` did with transformers 4.31: the
  new embedding and `lm_head` rows were initialised by the model's `_init_weights`.
  """
  if rows < table.shape[0]:
    raise ValueError(f"cannot shrink a vocabulary of {table.shape[0]} rows to {rows}")
  new_rows = stddev * jax.random.normal(rng, (rows - table.shape[0], table.shape[1]),
                                        jnp.float32)
  return np.concatenate([np.asarray(table), np.asarray(new_rows, table.dtype)], axis=0)


def load_llama(path: str | os.PathLike, *, vocab_size: int | None = None,
               rng: jax.Array | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               **attributes) -> tuple[LlamaForCausalLM, dict[str, Any]]:
  """Loads a Hugging Face `LlamaForCausalLM` checkpoint directory.

  Args:
    path: a directory with config.json and safetensors (possibly sharded with an index json)
      or pytorch_model.bin weights (read with `torch.load(weights_only=True)`).
    vocab_size: grow the vocabulary to this many ids (32002 for MM-Interleaved), the new
      embedding and `lm_head` rows drawn from N(0, initializer_range) as the release's
      `resize_token_embeddings` did; None keeps the checkpoint's.
    rng: the key for those new rows (required when the vocabulary grows).
    dtype: computation dtype (None: float32 params give float32 compute).
    param_dtype: dtype the params are converted to.
    **attributes: `attention_implementation`, `remat_policy`, `precision`.

  Returns:
    `(module, params)`: `module.apply({"params": params}, input_ids, attention_mask)` returns
    float32 logits `[B, L, vocab]` equal to `LlamaForCausalLM(input_ids, attention_mask)`.
  """
  hf_config = _pretrained_config(path)
  if hf_config.model_type != "llama":
    raise ValueError(f"{path}: model_type {hf_config.model_type!r} is not llama")
  config = llama_config(hf_config)
  module = LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, **attributes)
  abstract = abstract_params(module, jax.ShapeDtypeStruct((1, 1), jnp.int32))
  tensors = checkpoint_files.open_checkpoint(path)
  params = params_from_state_dict(abstract, tensors, ignore=LLAMA_UNUSED,
                                  source=f"Llama checkpoint {path}")
  if vocab_size is not None and vocab_size != config.vocab_size:
    if rng is None:
      raise ValueError("load_llama: growing the vocabulary needs an rng for the new rows")
    embed_rng, head_rng = jax.random.split(rng)
    embedding = params["model"]["embed_tokens"]
    embedding["embedding"] = grow_vocabulary(embedding["embedding"], vocab_size, embed_rng,
                                             config.initializer_range)
    if not config.tie_word_embeddings:
      head = params["lm_head"]
      head["kernel"] = grow_vocabulary(head["kernel"].T, vocab_size, head_rng,
                                       config.initializer_range).T
    config = dataclasses.replace(config, vocab_size=vocab_size)
    module = module.clone(config=config)
  return module, jax.tree.map(jnp.asarray, params)


__all__ = ["CLIP_UNUSED", "LLAMA_UNUSED", "grow_vocabulary", "llama_config", "load_llama",
           "rope_settings", "QFORMER_UNUSED", "clip_vision_attributes", "clip_vision_params",
           "clip_vision_prefix", "load_clip_trunk", "load_clip_vision", "load_qformer",
           "qformer_config",
           "qformer_params"]
