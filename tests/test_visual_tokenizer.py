"""The ViT-Adapter encoder and the visual tokenizer against an independent PyTorch reference
built with the release's module names; 13B shapes; trainable params; sharding."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from configs import mmi_13b, tiny
from mmi_jax import sharding, trainable
from mmi_jax.convert import hf, release
from mmi_jax.convert.torch_names import ConversionError, to_torch_layout
from mmi_jax.param_names import release_key, torch_name
from mmi_jax.models.vit_adapter import (CLIPViTAdapter, Injector, adapter_shapes,
                                        reference_points)
from mmi_jax.models.visual_tokenizer import VisualTokenizer, frozen_param_patterns
from test_mmfs import SHAPES_13B
import torch_vision_references as ref
from torch_model_references import visual_tokenizer_reference


def _torch_modules(model_config):
  return ref.perturb_(visual_tokenizer_reference(model_config), seed=0)


@pytest.fixture(scope="session")
def tiny_case():
  """The tiny visual tokenizer, its params converted from the perturbed torch reference's
  release-named state dict, images, and both models' outputs."""
  model_config = tiny.get_config().model
  torch.manual_seed(0)
  reference = _torch_modules(model_config)
  state = {f"visual_tokenizer.{key}": value.detach().numpy()
           for key, value in reference.state_dict().items()}
  module = VisualTokenizer.from_config(model_config)
  size = model_config.vision_encoder.image_size
  images = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
  abstract = sharding.abstract_params(module, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  params = jax.tree.map(jnp.asarray, release.visual_tokenizer_params(abstract, state))
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x))
  outputs = apply(params, images)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  return dict(module=module, params=params, abstract=abstract, images=images, apply=apply,
              outputs=outputs, expected=expected, state=state, config=model_config,
              reference=reference)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / np.abs(expected).max()


def test_visual_tokens_match_the_torch_reference(tiny_case):
  vis_embed, image_embeds, _ = tiny_case["expected"]
  assert tiny_case["outputs"]["vis_embed"].shape == vis_embed.shape
  assert _relative_error(tiny_case["outputs"]["vis_embed"], vis_embed.numpy()) <= 1e-4
  assert _relative_error(tiny_case["outputs"]["image_embeds"], image_embeds.numpy()) <= 1e-4


def test_multiscale_maps_match_the_torch_reference(tiny_case):
  _, _, maps = tiny_case["expected"]
  ours = tiny_case["outputs"]["multiscale_features"]
  grid = 56 // 14
  assert [m.shape[1] for m in ours] == [4 * grid, 2 * grid, grid, grid // 2]
  for actual, expected in zip(ours, maps):
    assert _relative_error(actual, expected.permute(0, 2, 3, 1).numpy()) <= 1e-4


def test_adapter_last_hidden_state_matches_the_torch_reference(tiny_case):
  module, params = tiny_case["module"], tiny_case["params"]
  encoder = CLIPViTAdapter.from_config(tiny_case["config"])
  images = tiny_case["images"]
  mean, std = np.array(module.pixel_mean), np.array(module.pixel_std)
  pixels = ((images - mean) / std).astype(np.float32)
  ours = jax.jit(lambda p, x: encoder.apply({"params": p}, x))(params["encoder"], pixels)
  reference = tiny_case["reference"].encoder.vision_model
  with torch.no_grad():
    last_hidden, _ = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2))
  assert _relative_error(ours["last_hidden_state"], last_hidden.numpy()) <= 1e-4


def test_injector_starts_as_the_identity():
  """gamma is initialised to 0 (SPEC 3), so at init the ViT tokens pass unchanged."""
  adapter = tiny.get_config().model.vision_adapter
  shapes = adapter_shapes(2)[1]
  injector = Injector(16, feat_shapes=shapes, num_heads=4, num_points=adapter.num_points,
                      value_ratio=adapter.value_ratio, gamma_init=adapter.gamma_init)
  rng = np.random.default_rng(0)
  query = rng.standard_normal((2, 4, 16)).astype(np.float32)
  feat = rng.standard_normal((2, sum(h * w for h, w in shapes), 16)).astype(np.float32)
  points = reference_points(((2, 2),))
  variables = injector.init(jax.random.key(0), query, points, feat)
  assert not np.any(np.asarray(nn.meta.unbox(variables)["params"]["gamma"]))
  np.testing.assert_array_equal(injector.apply(variables, query, points, feat), query)


def test_release_keys_load_and_bad_state_dicts_are_reported(tiny_case):
  state = dict(tiny_case["state"])
  # Every release key is used, except the buffers mmi_jax recomputes.
  state["visual_tokenizer.clip_mean"] = np.zeros((1, 3, 1, 1), np.float32)
  release.visual_tokenizer_params(tiny_case["abstract"], state)
  broken = dict(state)
  del broken["visual_tokenizer.proj.weight"]
  broken["visual_tokenizer.encoder.vision_model.adapter_up.weight"] = np.zeros((1, 2, 3, 4))
  broken["visual_tokenizer.surprise"] = np.zeros(3)
  with pytest.raises(ConversionError) as error:
    release.visual_tokenizer_params(tiny_case["abstract"], broken)
  message = str(error.value)
  assert "1 missing" in message and "visual_tokenizer.proj.weight" in message
  assert "1 unexpected" in message and "visual_tokenizer.surprise" in message
  assert "1 shape mismatch" in message and "adapter_up.weight" in message


def _release_entries(prefix="visual_tokenizer."):
  state = json.loads(SHAPES_13B.read_text())["state_dict"]
  return {key: entry for key, entry in state.items()
          if key.startswith(prefix) and entry["kind"] == "parameter"}


@pytest.fixture(scope="module")
def abstract_13b():
  module = VisualTokenizer.from_config(mmi_13b.get_config().model)
  return sharding.abstract_params(module, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_parameter_names_and_shapes_equal_the_release(abstract_13b):
  entries = _release_entries()
  ours = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      nn.meta.unbox(abstract_13b))[0]:
    names = tuple(k.key for k in path)
    key = release_key(torch_name(names, "visual_tokenizer."))
    view = np.broadcast_to(np.float32(0), leaf.shape)  # no memory, any shape
    ours[key] = to_torch_layout(names, view).shape
  assert set(ours) == set(entries)
  assert {key: tuple(entry["shape"]) for key, entry in entries.items()} == ours


def test_13b_parameter_count_and_trainable_split_equal_the_release(abstract_13b):
  mask = trainable.unfrozen_mask(abstract_13b, frozen_param_patterns(freeze_vit=True))
  # SPEC section 12: visual_tokenizer 433,312,960 total / 129,872,064 trainable.
  assert trainable.count_params(abstract_13b) == 433_312_960
  assert trainable.count_params(abstract_13b, mask) == 129_872_064
  flat = {"/".join(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not flat["encoder/encoder/layers_23/mlp/fc2/kernel"]
  assert not flat["encoder/embeddings/patch_embedding/kernel"]
  assert not flat["pos_embed"]
  assert flat["encoder/adapter_interactions_0/injector/gamma"]
  assert flat["perceiver_resampler/queries"] and flat["proj/kernel"] and flat["post_ln/scale"]


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_trainable_mask_agrees_with_the_release_requires_grad(abstract_13b):
  entries = _release_entries()
  mask = trainable.unfrozen_mask(abstract_13b, frozen_param_patterns())
  for path, trains in jax.tree_util.tree_flatten_with_path(mask)[0]:
    key = release_key(torch_name(tuple(k.key for k in path), "visual_tokenizer."))
    assert trains == entries[key]["requires_grad"], key


def test_sharded_forward_equals_single_device(tiny_case):
  module, params = tiny_case["module"], tiny_case["params"]
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding.param_shardings(tiny_case["abstract"], mesh)
  sharded_params = jax.device_put(params, shardings)
  images = np.concatenate([tiny_case["images"], tiny_case["images"][::-1] * 0.5])  # batch 4
  single = tiny_case["apply"](params, images)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def forward(p, x):
    return module.apply({"params": p}, x)

  with sharding.use_mesh(mesh):
    sharded = jax.jit(forward, in_shardings=(shardings, batch_sharding))(
        sharded_params, jax.device_put(images, batch_sharding))
  assert sharding.shard_shapes(sharded_params)["encoder"]["encoder"]["layers_0"]["mlp"][
      "fc1"]["kernel"] == (32, 64)  # [64, 128] split over fsdp and tensor
  for actual, expected in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_images_are_rejected_with_the_expected_shape(tiny_case):
  module, params = tiny_case["module"], tiny_case["params"]
  with pytest.raises(ValueError, match=r"\[B, 56, 56, C\]"):
    module.apply({"params": params}, np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    module.apply({"params": params}, np.zeros((1, 3, 56, 56), np.float32))


@pytest.mark.parametrize("checkpoint_size", [56, 84], ids=["same-size", "resized-positions"])
def test_public_clip_weights_load_into_the_tokenizer_encoder(tiny_case, tmp_path,
                                                             checkpoint_size):
  """The training starting point: HF CLIP weights into the adapter's ViT trunk; a checkpoint
  for another image size has its position table resized as the release does
  (bicubic, align_corners=True)."""
  vision = tiny_case["config"].vision_encoder
  torch.manual_seed(3)
  model = CLIPVisionModel(CLIPVisionConfig(
      hidden_size=vision.hidden_size, intermediate_size=vision.mlp_dim,
      num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
      image_size=checkpoint_size, patch_size=vision.patch_size))
  model.save_pretrained(tmp_path)
  trunk = hf.load_clip_trunk(tmp_path, tiny_case["abstract"]["encoder"])
  assert set(trunk) == {"embeddings", "pre_layrnorm", "encoder"}
  state = model.state_dict()
  np.testing.assert_array_equal(trunk["encoder"]["layers_23"]["mlp"]["fc2"]["kernel"],
                                state["encoder.layers.23.mlp.fc2.weight"].numpy().T)
  table = state["embeddings.position_embedding.weight"]
  if checkpoint_size != 56:
    side = checkpoint_size // 14
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(4, 4), mode="bicubic", align_corners=True)
    table = torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(16, -1)])
  np.testing.assert_allclose(trunk["embeddings"]["position_embedding"]["embedding"],
                             table.numpy(), rtol=1e-5, atol=1e-6)
  # Merged into the tokenizer's params, the tree is complete and runs.
  params = dict(tiny_case["params"])
  params["encoder"] = {**params["encoder"], **jax.tree.map(jnp.asarray, trunk)}
  outputs = tiny_case["apply"](params, tiny_case["images"])
  assert np.all(np.isfinite(np.asarray(outputs["vis_embed"])))


def test_rematerialized_adapter_has_the_same_gradients(tiny_case):
  """remat_policy wraps the ViT layers, injectors and extractors without changing the math
  (on a 4-layer variant of the tiny encoder, to keep the gradient compile short)."""
  config = tiny_case["config"]
  model_config = config.copy_and_resolve_references()
  model_config.vision_encoder.num_layers = 4
  model_config.vision_adapter.interaction_indexes = ((0, 0), (1, 1), (2, 2), (3, 3))
  pixels = tiny_case["images"] - 0.5
  rng = np.random.default_rng(0)
  abstract = sharding.abstract_params(CLIPViTAdapter.from_config(model_config), pixels)
  params = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                        nn.meta.unbox(abstract))

  def gradients(policy):
    encoder = CLIPViTAdapter.from_config(model_config, remat_policy=policy)

    def loss(p):
      outputs = encoder.apply({"params": p}, pixels)
      return outputs["last_hidden_state"].sum() + sum(
          m.mean() for m in outputs["multiscale_features"])

    return jax.jit(jax.grad(loss))(params)

  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa
  plain, remat = flat(gradients(None)), flat(gradients("nothing_saveable"))
  assert _relative_error(remat, plain) <= 1e-5
