"""CLIP's vision tower loaded from Hugging Face checkpoint directories, against transformers."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from mmi_jax.convert import hf
from mmi_jax.convert.torch_names import ConversionError

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
  directory = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(directory)
  module, params = hf.load_clip_vision(directory)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)["last_hidden_state"])
  return model, directory, module, params, apply


def _expected(model, images, interpolate):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2),
                 interpolate_pos_encoding=interpolate).last_hidden_state.numpy()


def _relative_error(actual, expected):
  return np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("size", [28, 42, 21], ids=["native", "upsampled-positions",
                                                    "downsampled-positions"])
def test_last_hidden_state_equals_transformers(vision_checkpoint, size):
  model, _, _, params, apply = vision_checkpoint
  images = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
  ours = apply(params, images)
  expected = _expected(model, images, interpolate=size != 28)
  assert ours.shape == expected.shape == (2, 1 + (size // 7) ** 2, 32)
  assert _relative_error(ours, expected) <= 1e-4


def test_pytorch_bin_checkpoint_loads_the_same(vision_checkpoint, tmp_path):
  model, _, _, params, _ = vision_checkpoint
  model.config.save_pretrained(tmp_path)
  state = {f"vision_model.{k}": v for k, v in model.state_dict().items()}  # transformers-4 keys
  torch.save(state, tmp_path / "pytorch_model.bin")
  _, loaded = hf.load_clip_vision(tmp_path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_safetensors_with_an_index_load_the_same(vision_checkpoint, tmp_path):
  model, _, _, params, _ = vision_checkpoint
  model.config.save_pretrained(tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  weight_map = {}
  for name, shard_keys in shards.items():
    save_file({k: state[k] for k in shard_keys}, tmp_path / name)
    weight_map.update({k: name for k in shard_keys})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, loaded = hf.load_clip_vision(tmp_path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_clip_model_directory_gives_its_vision_tower(tmp_path):
  torch.manual_seed(1)
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
  model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=8)).eval()
  model.save_pretrained(tmp_path)
  module, params = hf.load_clip_vision(tmp_path)
  images = np.random.default_rng(0).standard_normal((1, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model.vision_model(torch.from_numpy(images).permute(0, 3, 1, 2)
                                  ).last_hidden_state.numpy()
  ours = module.apply({"params": params}, images)["last_hidden_state"]
  assert _relative_error(ours, expected) <= 1e-4


def test_bfloat16_checkpoint_converts_exactly(vision_checkpoint, tmp_path):
  model, _, _, _, _ = vision_checkpoint
  model.config.save_pretrained(tmp_path)
  state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  save_file(state, tmp_path / "model.safetensors")
  _, loaded = hf.load_clip_vision(tmp_path)
  kernel = np.asarray(loaded["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
  expected = state["encoder.layers.0.mlp.fc1.weight"].float().numpy().T
  np.testing.assert_array_equal(kernel, expected)


def test_remat_does_not_change_the_result(vision_checkpoint):
  _, directory, _, params, apply = vision_checkpoint
  remat_module, _ = hf.load_clip_vision(directory, remat_policy="nothing_saveable")
  images = np.random.default_rng(3).standard_normal((1, 28, 28, 3)).astype(np.float32)

  def loss(module):
    return lambda p: module.apply({"params": p}, images)["last_hidden_state"].sum()

  grads = jax.jit(jax.grad(loss(remat_module)))(params)
  plain = jax.jit(jax.grad(lambda p: apply(p, images).sum()))(params)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa
  assert _relative_error(flat(grads), flat(plain)) <= 1e-5  # same math, different fusion


def test_mismatched_or_missing_checkpoints_are_reported(vision_checkpoint, tmp_path):
  model, _, _, _, _ = vision_checkpoint
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_clip_vision(tmp_path)
  model.config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="no weights file"):
    hf.load_clip_vision(tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  state["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
  del state["pre_layrnorm.bias"]
  save_file(state, tmp_path / "model.safetensors")
  with pytest.raises(ConversionError) as error:
    hf.load_clip_vision(tmp_path)
  assert "pre_layrnorm.bias" in str(error.value)
  assert "encoder.layers.0.mlp.fc1.weight" in str(error.value)
  os.remove(tmp_path / "model.safetensors")
