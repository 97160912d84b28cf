"""mmi_jax params -> the standard PyTorch homes of MM-Interleaved's reusable parts.

Each function takes the FULL MM-Interleaved params tree (top-level `visual_tokenizer`,
`mm_decoder`, `text_decoder`, `soi_token`, `context_feat_proj`, `image_decoder`) and the model
config section (`config.model`), and writes one directory that the part's usual library loads:

  * `export_llama`: a Hugging Face `LlamaForCausalLM` (`mm_decoder` without its MMFS layers,
    `text_decoder` folded into `lm_head`);
  * `export_unet`: a diffusers `UNet2DConditionModel` (`image_decoder/decoder/unet`);
  * `export_vae`: a diffusers `AutoencoderKL` (`image_decoder/decoder/vae`);
  * `export_clip_vision`: a Hugging Face `CLIPVisionModel` (the CLIP trunk of
    `visual_tokenizer/encoder`);
  * `export_all`: the four, under `directory/{llama, unet, vae, clip_vision}`.

What stays behind, having no place in those classes: the MMFS layers of the LLM
(`llama_cross_attn`), the MMFS net of the image decoder (`decoder/mmfs_module`), the ViT-Adapter
modules, the Q-Formers (`perceiver_resampler`, the visual tokenizer's), `soi_token`,
`context_feat_proj` and `neg_prompt_embeds`. The exported models therefore compute what
MM-Interleaved computes without images: text-only LLM, the UNet without MMFS residuals.

Names and layouts are the inverse of the loaders' (`param_names.torch_name` and
`to_torch_layout`, diffusers' `time_embedding.linear_1`), so `hf.load_llama`,
`hf.load_clip_vision`, `diffusers.load_unet` and `diffusers.load_vae` read the directories back
to the same arrays. Tensors are streamed one by one into safetensors shards
(`checkpoint_files.write_checkpoint`), optionally cast to `dtype` (`jnp.bfloat16`: bfloat16
tensors). Every subtree is checked against the model the config describes first; a missing
subtree, a missing or unexpected param or a shape mismatch raises `ValueError` naming them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.convert.checkpoint_files import write_checkpoint
from mmi_jax.convert.diffusers import abstract_unet_params, abstract_vae_params
from mmi_jax.convert.hf import TRUNK_MODULES
from mmi_jax.convert.torch_names import check_same_tree, to_torch_layout
from mmi_jax.models.clip_vision import CLIPVisionTransformer
from mmi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from mmi_jax.models.text_head import TextHead
from mmi_jax.models.unet import UNet2DConditionModel, UNetConfig
from mmi_jax.models.vae import AutoencoderKL, VAEConfig
from mmi_jax.param_names import diffusers_key, torch_name
from mmi_jax.sharding import abstract_params

CLIP_VISION_PREFIX = "vision_model."  # read by transformers 4 and 5 alike
MMFS_LAYER_PARAMS = "llama_cross_attn"


class UnrepresentableError(ValueError):
  """The params hold something the export's format cannot (an `lm_head` bias for HF Llama)."""


def _subtree(params: Mapping[str, Any], path: str) -> Any:
  """`params[a][b]...` for `path` "a/b/...", or a ValueError naming the first missing level."""
  node, names = params, path.split("/")
  for depth, name in enumerate(names):
    if not isinstance(node, Mapping) or name not in node:
      found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"params have no {'/'.join(names[:depth + 1])} (needed: {path}); "
                       f"{'/'.join(names[:depth]) or 'the top level'} has {found}")
    node = node[name]
  return node


def _torch_tensors(flat: Mapping[tuple[str, ...], Any], dtype: Any, prefix: str = "",
                   rename=None) -> Iterator[tuple[str, np.ndarray]]:
  """`(state-dict key, array in torch layout and `dtype`)` for each param of `flat`."""
  for path, leaf in flat.items():
    key = torch_name(path, prefix)
    array = to_torch_layout(path, np.asarray(leaf))
    yield (rename(key) if rename else key), _cast(array, dtype)


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
  return array if dtype is None else array.astype(jnp.dtype(dtype))


def _dtype_name(flat: Mapping[tuple[str, ...], Any], dtype: Any) -> str:
  """The name of the written tensors' dtype (`float32`, `bfloat16`, ...)."""
  return jnp.dtype(dtype if dtype is not None else next(iter(flat.values())).dtype).name


def _prepare(directory: str | os.PathLike) -> pathlib.Path:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  return directory


# --------------------------------------------------------------------------------------------
# The LLM.


def export_llama(params: Mapping[str, Any], model_config: Any, directory: str | os.PathLike,
                 *, dtype: Any = None) -> pathlib.Path:
  """Writes `mm_decoder` and `text_decoder` as a Hugging Face `LlamaForCausalLM` directory.

  The directory holds `config.json` and `model.safetensors` (or shards with an index):
  `model.embed_tokens.weight [V, D]` with the whole vocabulary (32002 in the release),
  `model.layers.N.*` without the MMFS parts (`llama_cross_attn`, which a plain Llama cannot
  hold), `model.norm.weight`, and `lm_head.weight [V, D]`: the text head's `head` kernel
  transposed, with `head_new`'s kernel added onto the rows of the new ids (ids >=
  `tokens.text_vocab_size`).

  Hugging Face's `lm_head` has no bias. The text ids' bias is 0 in the release (a non-zero
  one raises ValueError rather than being dropped); the new ids' constant biases
  (`head.bias + head_new.bias` there, -5 at initialisation) cannot be represented, so the
  exported model's logits of the new ids are MM-Interleaved's minus that constant. Its last
  hidden state equals `MultimodalLM`'s text-only hidden states (no image features).

  Args:
    params: the full MM-Interleaved params tree.
    model_config: `config.model` (sections `llm`, `tokens`, `vision_encoder`).
    directory: created if missing.
    dtype: cast every tensor to this (e.g. `jnp.bfloat16`); None keeps the params' dtype.
  Returns:
    The directory.
  """
  import transformers  # noqa: PLC0415 (torch and transformers only for exporting)

  config = dataclasses.replace(LlamaConfig.from_config(model_config), mmfs=None)
  tokens = model_config.tokens
  text_vocab, width = tokens.text_vocab_size, config.hidden_size
  head = check_same_tree(_subtree(params, "text_decoder"),
                  abstract_params(TextHead(config.vocab_size, text_vocab),
                                  jax.ShapeDtypeStruct((1, 1, width), jnp.float32)),
                  "text_decoder", "config.model.tokens and llm")
  text_bias = np.asarray(head[("head", "bias")])[:text_vocab]
  if np.any(text_bias != 0):
    raise UnrepresentableError(
        f"text_decoder/head/bias is non-zero on {np.count_nonzero(text_bias)} text ids; "
        "Hugging Face's LlamaForCausalLM has no lm_head bias to hold it")
  head_kernel = np.asarray(head[("head", "kernel")])
  merged = head_kernel.astype(np.float32)  # [D, V]
  merged[:, text_vocab:] += np.asarray(head[("head_new", "kernel")], np.float32)

  decoder = {name: ({key: value for key, value in layer.items() if key != MMFS_LAYER_PARAMS}
                    if isinstance(layer, Mapping) else layer)
             for name, layer in _subtree(params, "mm_decoder").items()}
  abstract = abstract_params(LlamaForCausalLM(config), jax.ShapeDtypeStruct((1, 1), jnp.int32))
  lm = {"model": decoder, "lm_head": {"kernel": merged.astype(head_kernel.dtype)}}
  flat = check_same_tree(lm, abstract, "mm_decoder (without llama_cross_attn) and text_decoder",
                  "config.model.llm")

  directory = _prepare(directory)
  write_checkpoint(directory, _torch_tensors(flat, dtype))
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling_factor != 1.0:
    rope.update(rope_type="linear", factor=config.rope_scaling_factor)
  transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=width, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.attention_head_dim,
      hidden_act=config.activation, max_position_embeddings=config.max_position_embeddings,
      rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
      attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
      tie_word_embeddings=False, initializer_range=config.initializer_range,
      bos_token_id=tokens.bos_id, eos_token_id=tokens.eos_id, pad_token_id=tokens.pad_id,
      dtype=_dtype_name(flat, dtype), architectures=["LlamaForCausalLM"],
  ).save_pretrained(directory)
  return directory


# --------------------------------------------------------------------------------------------
# Stable Diffusion's UNet and VAE.


def _diffusers_version() -> str:
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return "0.42.1"


def _write_diffusers_config(directory: pathlib.Path, class_name: str, config: Any,
                            **fixed: Any) -> None:
  """`config.json` of a diffusers model: the class, version, the settings that select the
  family (`fixed`) and every field of mmi_jax's config (named as diffusers')."""
  values = {"_class_name": class_name, "_diffusers_version": _diffusers_version(), **fixed,
            **dataclasses.asdict(config)}
  (directory / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def export_unet(params: Mapping[str, Any], model_config: Any, directory: str | os.PathLike,
                *, dtype: Any = None) -> pathlib.Path:
  """Writes `image_decoder/decoder/unet` as a diffusers `UNet2DConditionModel` directory.

  The directory holds `config.json` (the SD 1.x/2.x family's settings from
  `config.model.image_decoder.unet`) and `diffusion_pytorch_model.safetensors`. The MMFS net
  (`decoder/mmfs_module`), which adds residuals after the UNet's mid block in MM-Interleaved,
  is not part of it: the exported UNet is MM-Interleaved's without image features
  (`UNet2DConditionModel.__call__`).

  Args / Returns: as `export_llama`.
  """
  config = UNetConfig.from_mapping(model_config.image_decoder.unet)
  flat = check_same_tree(_subtree(params, "image_decoder/decoder/unet"),
                  abstract_unet_params(UNet2DConditionModel(config)),
                  "image_decoder/decoder/unet", "config.model.image_decoder.unet")
  directory = _prepare(directory)
  write_checkpoint(directory, _torch_tensors(flat, dtype, rename=diffusers_key),
                   base_name="diffusion_pytorch_model")
  _write_diffusers_config(directory, "UNet2DConditionModel", config,
                          **UNetConfig.REQUIRED_DEFAULTS)
  return directory


def export_vae(params: Mapping[str, Any], model_config: Any, directory: str | os.PathLike,
               *, dtype: Any = None) -> pathlib.Path:
  """Writes `image_decoder/decoder/vae` as a diffusers `AutoencoderKL` directory.

  `config.json` carries `scaling_factor` (0.18215 for SD) and the block types;
  `diffusion_pytorch_model.safetensors` the weights.

  Args / Returns: as `export_llama`.
  """
  config = VAEConfig.from_mapping(model_config.image_decoder.vae)
  flat = check_same_tree(_subtree(params, "image_decoder/decoder/vae"),
                  abstract_vae_params(AutoencoderKL(config)),
                  "image_decoder/decoder/vae", "config.model.image_decoder.vae")
  directory = _prepare(directory)
  write_checkpoint(directory, _torch_tensors(flat, dtype), base_name="diffusion_pytorch_model")
  blocks = len(config.block_out_channels)
  _write_diffusers_config(directory, "AutoencoderKL", config,
                          down_block_types=["DownEncoderBlock2D"] * blocks,
                          up_block_types=["UpDecoderBlock2D"] * blocks,
                          shift_factor=None, latents_mean=None, latents_std=None)
  return directory


# --------------------------------------------------------------------------------------------
# The CLIP ViT.


def export_clip_vision(params: Mapping[str, Any], model_config: Any,
                       directory: str | os.PathLike, *, dtype: Any = None) -> pathlib.Path:
  """Writes the CLIP trunk of `visual_tokenizer/encoder` as a Hugging Face `CLIPVisionModel`.

  The trunk is the adapter's `embeddings`, `pre_layrnorm` and `encoder` (`CLIPVisionTransformer`
  params; the adapter modules stay behind), configured by `config.model.vision_encoder`. Keys
  are under `vision_model.`, which transformers 4 and 5 both load. MM-Interleaved has no
  post-LayerNorm; `post_layernorm` is written as the identity's parameters (weight 1, bias 0)
  since the class requires one. It acts only on the pooled output, so `last_hidden_state`
  equals `CLIPVisionTransformer`'s; the pooled output is not MM-Interleaved's.

  Args / Returns: as `export_llama`.
  """
  import transformers  # noqa: PLC0415

  vision = model_config.vision_encoder
  size, channels = vision.image_size, vision.get("num_channels", 3)
  trunk = {name: _subtree(params, f"visual_tokenizer/encoder/{name}") for name in TRUNK_MODULES}
  abstract = abstract_params(CLIPVisionTransformer.from_config(model_config),
                             jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))
  flat = check_same_tree(trunk, abstract,
                         "visual_tokenizer/encoder/{" + ", ".join(TRUNK_MODULES) + "}",
                         "config.model.vision_encoder")
  written = _dtype_name(flat, dtype)

  def tensors():
    yield from _torch_tensors(flat, dtype, prefix=CLIP_VISION_PREFIX)
    width = vision["hidden_size"]
    yield f"{CLIP_VISION_PREFIX}post_layernorm.weight", np.ones((width,), jnp.dtype(written))
    yield f"{CLIP_VISION_PREFIX}post_layernorm.bias", np.zeros((width,), jnp.dtype(written))

  directory = _prepare(directory)
  write_checkpoint(directory, tensors())
  transformers.CLIPVisionConfig(
      hidden_size=vision["hidden_size"], intermediate_size=vision["mlp_dim"],
      num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_heads"],
      num_channels=channels, image_size=size, patch_size=vision["patch_size"],
      hidden_act=vision["activation"], layer_norm_eps=vision["layer_norm_eps"],
      dtype=written, architectures=["CLIPVisionModel"],
  ).save_pretrained(directory)
  return directory


EXPORTS = {"llama": export_llama, "unet": export_unet, "vae": export_vae,
           "clip_vision": export_clip_vision}


def export_all(params: Mapping[str, Any], model_config: Any, directory: str | os.PathLike,
               *, dtype: Any = None) -> dict[str, pathlib.Path]:
  """The exports of the parts the model has, under `directory/{llama, unet, vae,
  clip_vision}` (a model without an image decoder has no UNet and no VAE).

  Returns:
    `{"llama": ..., "unet": ..., "vae": ..., "clip_vision": ...}`, the directories written.
  """
  directory = pathlib.Path(directory)
  return {name: EXPORTS[name](params, model_config, directory / name, dtype=dtype)
          for name in parts(model_config)}


def parts(model_config: Any) -> list[str]:
  """The names of the exports the model has (no UNet and no VAE without an image decoder)."""
  return [name for name in EXPORTS
          if name not in ("unet", "vae") or model_config.get("image_decoder") is not None]


__all__ = ["CLIP_VISION_PREFIX", "EXPORTS", "UnrepresentableError", "export_all",
           "export_clip_vision", "export_llama", "export_unet", "export_vae", "parts"]
