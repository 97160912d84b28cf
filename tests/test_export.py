"""Exports of MM-Interleaved's parts (`convert/export.py`): each directory loads in transformers
or diffusers without missing or unexpected keys, computes there what mmi_jax computes, and
reads back through mmi_jax's loaders to the same arrays."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from configs import tiny
from mmi_jax.convert import checkpoint_files, export, hf, release
from mmi_jax.convert import diffusers as convert_diffusers
from mmi_jax.models.clip_vision import CLIPVisionTransformer
from mmi_jax.models.image_decoder import ImageDecoderConfig
from mmi_jax.models.multimodal_lm import MultimodalLM
from mmi_jax.models.unet import UNet2DConditionModel
from mmi_jax.models.vae import AutoencoderKL
from random_params import random_params

CONFIG = tiny.get_config().model
TEXT_VOCAB = CONFIG.tokens.text_vocab_size
TRUNK = ("embeddings", "pre_layrnorm", "encoder")


@functools.lru_cache(maxsize=None)
def _full_params():
  """A full MM-Interleaved params tree of the tiny config (MMFS layers included)."""
  params = random_params(release.param_shapes(CONFIG), seed=0)
  params["text_decoder"]["head"]["bias"][:TEXT_VOCAB] = 0.0  # as released
  return params


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  return export.export_all(_full_params(), CONFIG, tmp_path_factory.mktemp("export"))


def _relative_error(ours, reference):
  return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def _nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(array):
  return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _assert_loaded_cleanly(info):
  assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs")), info


def test_llama_export_reproduces_the_text_only_forward(exported):
  params = _full_params()
  torch_model, info = transformers.LlamaForCausalLM.from_pretrained(
      exported["llama"], dtype=torch.float32, output_loading_info=True)
  _assert_loaded_cleanly(info)
  assert torch_model.config.vocab_size == CONFIG.tokens.vocab_size
  assert torch_model.config.pad_token_id == CONFIG.tokens.pad_id
  tokens = np.random.default_rng(1).integers(3, TEXT_VOCAB, (2, 9)).astype(np.int32)
  tokens[:, 0] = CONFIG.tokens.bos_id
  module = MultimodalLM.from_config(CONFIG)
  lm_params = {name: params[name] for name in ("mm_decoder", "text_decoder", "soi_token")}
  ours = jax.jit(module.apply)({"params": lm_params}, jnp.asarray(tokens))
  with torch.no_grad():
    ids = torch.from_numpy(tokens).long()
    hidden = torch_model.model(input_ids=ids).last_hidden_state.numpy()
    logits = torch_model(input_ids=ids).logits.numpy()
  assert _relative_error(ours["hidden_states"], hidden) < 1e-4
  assert _relative_error(ours["logits"][..., :TEXT_VOCAB], logits[..., :TEXT_VOCAB]) < 1e-4
  head = params["text_decoder"]
  new_id_bias = head["head"]["bias"][TEXT_VOCAB:] + head["head_new"]["bias"]
  assert _relative_error(ours["logits"][..., TEXT_VOCAB:] - new_id_bias,
                         logits[..., TEXT_VOCAB:]) < 1e-4


def test_unet_export_reproduces_the_unet(exported):
  torch_unet, info = TorchUNet.from_pretrained(exported["unet"], output_loading_info=True)
  _assert_loaded_cleanly(info)
  config = ImageDecoderConfig.from_config(CONFIG).unet
  rng = np.random.default_rng(2)
  sample = rng.standard_normal((2, 8, 8, config.in_channels)).astype(np.float32)
  timesteps = np.array([3, 917])
  context = rng.standard_normal((2, 5, config.cross_attention_dim)).astype(np.float32)
  unet_params = _full_params()["image_decoder"]["decoder"]["unet"]
  ours = jax.jit(UNet2DConditionModel(config).apply)({"params": unet_params}, sample,
                                                     timesteps, context)
  with torch.no_grad():
    reference = _nhwc(torch_unet(_nchw(sample), torch.from_numpy(timesteps),
                                 torch.from_numpy(context)).sample)
  assert _relative_error(ours, reference) < 1e-4


def test_vae_export_reproduces_encode_mean_and_decode(exported):
  torch_vae, info = TorchAutoencoderKL.from_pretrained(exported["vae"], output_loading_info=True)
  _assert_loaded_cleanly(info)
  config = ImageDecoderConfig.from_config(CONFIG).vae
  assert torch_vae.config.scaling_factor == pytest.approx(config.scaling_factor)
  rng = np.random.default_rng(3)
  images = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  latents = rng.standard_normal((1, 2, 2, config.latent_channels)).astype(np.float32)
  variables = {"params": _full_params()["image_decoder"]["decoder"]["vae"]}
  apply = jax.jit(AutoencoderKL(config).apply, static_argnames="method")
  with torch.no_grad():
    mean = _nhwc(torch_vae.encode(_nchw(images)).latent_dist.mean)
    decoded = _nhwc(torch_vae.decode(_nchw(latents)).sample)
  assert _relative_error(apply(variables, images, method="encode"), mean) < 1e-4
  assert _relative_error(apply(variables, latents, method="decode"), decoded) < 1e-4


def test_clip_vision_export_reproduces_the_trunk(exported):
  torch_clip, info = transformers.CLIPVisionModel.from_pretrained(
      exported["clip_vision"], dtype=torch.float32, output_loading_info=True)
  _assert_loaded_cleanly(info)
  vision = CONFIG.vision_encoder
  images = np.random.default_rng(4).standard_normal(
      (2, vision.image_size, vision.image_size, 3)).astype(np.float32)
  encoder = _full_params()["visual_tokenizer"]["encoder"]
  module = CLIPVisionTransformer.from_config(CONFIG)
  ours = jax.jit(module.apply)({"params": {name: encoder[name] for name in TRUNK}}, images)
  with torch.no_grad():
    reference = torch_clip(pixel_values=_nchw(images)).last_hidden_state.numpy()
  assert _relative_error(ours["last_hidden_state"], reference) < 1e-4


def _assert_same_arrays(loaded, expected):
  loaded = traverse_util.flatten_dict(jax.tree.map(np.asarray, loaded))
  expected = traverse_util.flatten_dict(jax.tree.map(np.asarray, expected))
  assert loaded.keys() == expected.keys()
  for path, array in expected.items():
    np.testing.assert_array_equal(loaded[path], array, err_msg="/".join(path))


def test_loaders_read_the_exports_back_bitwise(exported):
  params = _full_params()
  decoder = params["image_decoder"]["decoder"]
  _assert_same_arrays(convert_diffusers.load_unet(exported["unet"])[1], decoder["unet"])
  _assert_same_arrays(convert_diffusers.load_vae(exported["vae"])[1], decoder["vae"])
  encoder = params["visual_tokenizer"]["encoder"]
  _assert_same_arrays(hf.load_clip_vision(exported["clip_vision"])[1],
                      {name: encoder[name] for name in TRUNK})
  _, llama = hf.load_llama(exported["llama"])
  layers = {name: {key: value for key, value in layer.items() if key != "llama_cross_attn"}
            for name, layer in params["mm_decoder"].items()}
  head = params["text_decoder"]
  lm_head = head["head"]["kernel"].copy()
  lm_head[:, TEXT_VOCAB:] += head["head_new"]["kernel"]
  _assert_same_arrays(llama, {"model": layers, "lm_head": {"kernel": lm_head}})


def test_bfloat16_export_writes_bfloat16_tensors(exported, tmp_path):
  directories = export.export_all(_full_params(), CONFIG, tmp_path, dtype=jnp.bfloat16)
  assert directories.keys() == exported.keys()
  for name, directory in directories.items():
    written, reference = (checkpoint_files.open_checkpoint(d)
                          for d in (directory, exported[name]))
    assert sorted(written.keys()) == sorted(reference.keys())
    for key in written.keys():
      assert written[key].dtype == ml_dtypes.bfloat16, (name, key)
      np.testing.assert_array_equal(written[key], reference[key].astype(ml_dtypes.bfloat16))
  assert transformers.AutoConfig.from_pretrained(directories["llama"]).dtype == torch.bfloat16


def test_missing_or_mismatched_params_fail_clearly(tmp_path):
  params = _full_params()
  no_unet = dict(params, image_decoder={"decoder": {"vae": {}}})
  with pytest.raises(ValueError, match="no image_decoder/decoder/unet"):
    export.export_unet(no_unet, CONFIG, tmp_path)
  with pytest.raises(ValueError, match="no visual_tokenizer.*the top level has"):
    export.export_clip_vision({"mm_decoder": params["mm_decoder"]}, CONFIG, tmp_path)
  vae = traverse_util.flatten_dict(params["image_decoder"]["decoder"]["vae"])
  vae[("quant_conv", "bias")] = np.zeros(3, np.float32)
  del vae[("post_quant_conv", "kernel")]
  broken = dict(params, image_decoder={"decoder": {"vae": traverse_util.unflatten_dict(vae)}})
  with pytest.raises(ValueError, match=r"(?s)1 missing:.*post_quant_conv/kernel.*"
                                       r"shape mismatch:.*quant_conv/bias: params \(3,\)"):
    export.export_vae(broken, CONFIG, tmp_path)
  head = params["text_decoder"]["head"]
  biased = dict(params, text_decoder=dict(params["text_decoder"],
                                          head=dict(head, bias=head["bias"] + 1.0)))
  with pytest.raises(ValueError, match="no lm_head bias"):
    export.export_llama(biased, CONFIG, tmp_path)
