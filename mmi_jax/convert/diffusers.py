"""Stable Diffusion from a diffusers directory: the UNet, the VAE and the noise schedule.

A diffusers pipeline directory holds `unet/`, `vae/` and `scheduler/`, each with a
config json and (for the models) `diffusion_pytorch_model.safetensors` or `.bin`, possibly
sharded with an index json. Each loader accepts the pipeline directory or the component's own
directory. Config keys map onto `UNetConfig` / `VAEConfig` by name; settings of other model
families raise `NotImplementedError` naming them, rather than loading into the wrong model.
Weights map by the `torch_names` rule; every missing, unexpected or mis-shaped tensor is
reported at once (`ConversionError`).

`neg_prompt_embeds` of MM-Interleaved's image decoder starts from Stable Diffusion's embedding
of the empty prompt; `empty_prompt_embedding` computes it with the pipeline's `text_encoder/`
and `tokenizer/` (transformers' PyTorch CLIP text model; the only use of torch here).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmi_jax.convert import checkpoint_files
from mmi_jax.convert.torch_names import params_from_state_dict
from mmi_jax.diffusion.noise_schedule import NoiseSchedule
from mmi_jax.models.unet import UNet2DConditionModel, UNetConfig
from mmi_jax.models.vae import AutoencoderKL, VAEConfig
from mmi_jax.param_names import diffusers_key
from mmi_jax.sharding import abstract_params


def component_directory(path: str | os.PathLike, component: str) -> pathlib.Path:
  """`path/component` when `path` is a pipeline directory, else `path` itself."""
  path = pathlib.Path(path)
  if (path / component / "config.json").is_file():
    return path / component
  if (path / "config.json").is_file():
    return path
  raise FileNotFoundError(f"{path}: no config.json here or in {path / component}; expected a "
                          f"diffusers pipeline directory or its {component}/ directory")


def read_config(directory: pathlib.Path) -> dict[str, Any]:
  file = directory / "config.json"
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{file}: not valid JSON ({error})") from None


def unet_config(path: str | os.PathLike) -> UNetConfig:
  """The `UNetConfig` of a diffusers UNet (`unet/config.json`)."""
  directory = component_directory(path, "unet")
  return UNetConfig.from_mapping(read_config(directory))


def vae_config(path: str | os.PathLike) -> VAEConfig:
  """The `VAEConfig` of a diffusers AutoencoderKL (`vae/config.json`)."""
  directory = component_directory(path, "vae")
  return VAEConfig.from_mapping(read_config(directory))


def unet_params(path: str | os.PathLike, abstract: Any) -> dict[str, Any]:
  """A diffusers UNet's weights as params shaped like `abstract` (NumPy arrays)."""
  directory = component_directory(path, "unet")
  return params_from_state_dict(abstract, checkpoint_files.open_checkpoint(directory),
                                rename=diffusers_key, source=f"diffusers UNet {directory}")


def vae_params(path: str | os.PathLike, abstract: Any) -> dict[str, Any]:
  """A diffusers AutoencoderKL's weights as params shaped like `abstract` (NumPy arrays)."""
  directory = component_directory(path, "vae")
  return params_from_state_dict(abstract, checkpoint_files.open_checkpoint(directory),
                                source=f"diffusers VAE {directory}")


def abstract_unet_params(module: UNet2DConditionModel) -> Any:
  config = module.config
  side = 2 * config.downsampling_factor
  return abstract_params(
      module, jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32),
      jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32))


def abstract_vae_params(module: AutoencoderKL) -> Any:
  side = module.config.downsampling_factor
  return abstract_params(
      module, jax.ShapeDtypeStruct((1, side, side, module.config.in_channels), jnp.float32))


def load_unet(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32,
              **attributes) -> tuple[UNet2DConditionModel, dict[str, Any]]:
  """Loads a diffusers `UNet2DConditionModel` (SD 1.x / 2.x family).

  Args:
    path: a diffusers pipeline directory (with `unet/`) or a UNet directory.
    dtype: computation dtype (None: follow the inputs).
    param_dtype: dtype the params are converted to.
    **attributes: `attention_implementation`, `remat_policy`, `precision`.

  Returns:
    `(module, params)`: `module.apply({"params": params}, sample [B, H, W, C], timesteps [B],
    encoder_hidden_states [B, S, E])` equals diffusers' output transposed to channels-last.
  """
  module = UNet2DConditionModel(unet_config(path), dtype=dtype, param_dtype=param_dtype,
                                **attributes)
  params = unet_params(path, abstract_unet_params(module))
  return module, jax.tree.map(jnp.asarray, params)


def load_vae(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32,
             **attributes) -> tuple[AutoencoderKL, dict[str, Any]]:
  """Loads a diffusers `AutoencoderKL`.

  Returns:
    `(module, params)`: `module.apply({"params": params}, images, method="encode")` gives the
    latent mean `[B, H/8, W/8, 4]` of images `[B, H, W, 3]` in [-1, 1], and
    `method="decode"` maps (unscaled) latents back to images.
  """
  module = AutoencoderKL(vae_config(path), dtype=dtype, param_dtype=param_dtype, **attributes)
  params = vae_params(path, abstract_vae_params(module))
  return module, jax.tree.map(jnp.asarray, params)


def load_noise_schedule(path: str | os.PathLike) -> NoiseSchedule:
  """The training noise schedule of `scheduler/scheduler_config.json` (a pipeline directory,
  the scheduler directory or the json file)."""
  return NoiseSchedule.from_diffusers(path)


def empty_prompt_embedding(path: str | os.PathLike) -> np.ndarray:
  """Stable Diffusion's text embedding of `""`: `[1, 77, width]` float32.

  As the release's `get_negative_prompt_embeds`: the pipeline's tokenizer pads `""` to its
  `model_max_length`, and the CLIP text encoder's `last_hidden_state` is the embedding.
  """
  import torch
  import transformers

  root = pathlib.Path(path)
  for component in ("tokenizer", "text_encoder"):
    if not (root / component).is_dir():
      raise FileNotFoundError(f"{root}: no {component}/ directory; empty_prompt_embedding "
                              "needs a full diffusers pipeline directory")
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
  encoder = transformers.CLIPTextModel.from_pretrained(root / "text_encoder",
                                                       torch_dtype=torch.float32)
  tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")
  with torch.no_grad():
    hidden = encoder(tokens.input_ids, attention_mask=None).last_hidden_state
  return hidden.numpy().astype(np.float32)


__all__ = ["abstract_unet_params", "abstract_vae_params", "component_directory",
           "empty_prompt_embedding", "load_noise_schedule", "load_unet", "load_vae",
           "read_config", "unet_config", "unet_params", "vae_config", "vae_params"]
