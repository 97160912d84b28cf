"""MMFS against an independent PyTorch implementation of SPEC section 6, and its contracts."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import mmi_13b
from mmi_jax import sharding
from mmi_jax.models.mmfs import MMFS, relative_image_positions
from release_shapes import SHAPES_13B, release_shapes_of
from torch_references import mmfs_reference

HEADS, POINTS = 16, 8
QUERY_DIM, VALUE_DIM, ATTENTION_DIM, OUTPUT_DIM = 24, 20, 32, 28


def _module(scale_sizes, base=2, max_images=50, dtype=None, param_dtype=jnp.float32):
  return MMFS(query_dim=QUERY_DIM, attention_dim=ATTENTION_DIM, output_dim=OUTPUT_DIM,
              scale_sizes=scale_sizes, base_spatial_shape=base, num_heads=HEADS, num_points=POINTS,
              max_images=max_images, dtype=dtype, param_dtype=param_dtype)


def _inputs(seed, batch, queries, num_images, scale_sizes):
  rng = np.random.default_rng(seed)
  positions = sum(s * s for s in scale_sizes)
  query = rng.standard_normal((batch, queries, QUERY_DIM)).astype(np.float32)
  reference = rng.uniform(0, 1, (batch, queries, 2)).astype(np.float32)
  values = rng.standard_normal((batch, num_images, positions, VALUE_DIM)).astype(np.float32)
  return query, reference, values


def _masks(seed, batch, queries, num_images, kind):
  """Random visibility with whole rows that see no image."""
  rng = np.random.default_rng(seed)
  if kind == "2d":
    mask = rng.integers(0, 2, (batch, num_images))
    mask[0, -1] = 1
    mask[-1] = 0  # the last sequence sees no image at all
  else:
    mask = rng.integers(0, 2, (batch, queries, num_images))
    mask[:, 0] = 0  # the first query of every sequence sees no image
  return mask.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _params(scale_sizes, max_images=50):
  """Initialized params, then perturbed so that zero-initialized ones matter too."""
  query, reference, values = _inputs(0, 1, 2, 1, scale_sizes)
  params = nn.meta.unbox(_module(scale_sizes, max_images=max_images).init(
      jax.random.key(0), query, reference, values, np.ones((1, 1), np.float32))["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [leaf + 0.3 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def _torch_params(params):
  """Flax params -> the PyTorch names and layouts of the original MMFS."""
  out = {}
  for name in ("value_proj", "dynamic_offset_mask", "sampling_offsets", "attention_weights",
               "output_proj"):
    out[name + ".weight"] = torch.tensor(np.asarray(params[name]["kernel"], np.float64).T)
    out[name + ".bias"] = torch.tensor(np.asarray(params[name]["bias"], np.float64))
  out["query_relpos.weight"] = torch.tensor(np.asarray(params["query_relpos"], np.float64))
  out["ignore_token"] = torch.tensor(np.asarray(params["ignore_token"], np.float64))
  return out


def _reference(params, query, reference, values, mask, scale_sizes, base=2):
  as64 = lambda x: torch.tensor(np.asarray(x, np.float64))  # noqa: E731
  return mmfs_reference(_torch_params(params), as64(query), as64(reference), as64(values),
                        as64(mask), num_heads=HEADS, num_points=POINTS,
                        scale_sizes=scale_sizes, base_spatial_shape=base).numpy()


def _assert_close(actual, expected, rtol):
  error = np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()
  assert error <= rtol, f"relative error {error} > {rtol}"


@functools.lru_cache(maxsize=None)
def _jitted_apply(scale_sizes, dtype=None):
  module = _module(scale_sizes, dtype=dtype)
  return jax.jit(lambda params, *args: module.apply({"params": params}, *args))


@pytest.mark.parametrize("num_images", [1, 3, 30])
@pytest.mark.parametrize("scale_sizes", [(4, 2, 1), (5, 4, 2, 1)], ids=["3-scales", "4-scales"])
@pytest.mark.parametrize("mask_kind", ["2d", "3d"])
def test_mmfs_matches_spec_reference(num_images, scale_sizes, mask_kind):
  batch, queries = 2, 6
  query, reference, values = _inputs(num_images, batch, queries, num_images, scale_sizes)
  mask = _masks(num_images, batch, queries, num_images, mask_kind)
  params = _params(scale_sizes)
  output = _jitted_apply(scale_sizes)(params, query, reference, values, mask)
  assert output.shape == (batch, queries, OUTPUT_DIM)
  expected = _reference(params, query, reference, values, mask, scale_sizes)
  _assert_close(output, expected, 1e-5)


def test_shared_reference_point_for_all_sequences():
  # The LLM passes one (0.5, 0.5) reference point, broadcast over the batch.
  scale_sizes = (4, 2, 1)
  query, _, values = _inputs(5, 2, 4, 3, scale_sizes)
  reference = np.full((1, 4, 2), 0.5, np.float32)
  mask = _masks(5, 2, 4, 3, "3d")
  params = _params(scale_sizes)
  output = _jitted_apply(scale_sizes)(params, query, reference, values, mask)
  _assert_close(output, _reference(params, query, reference, values, mask, scale_sizes), 1e-5)


def test_queries_that_see_no_image_get_only_the_ignore_token():
  scale_sizes = (4, 2, 1)
  query, reference, values = _inputs(6, 1, 3, 2, scale_sizes)
  params = _params(scale_sizes)
  blind = _jitted_apply(scale_sizes)(params, query, reference, values, np.zeros((1, 2)))
  # All attention mass goes to the ignore slots: output = output_proj(ignore_token).
  ignore = np.asarray(params["ignore_token"])
  expected = ignore @ np.asarray(params["output_proj"]["kernel"]) + np.asarray(
      params["output_proj"]["bias"])
  np.testing.assert_allclose(np.asarray(blind), np.broadcast_to(expected, blind.shape),
                             rtol=1e-5, atol=1e-5)


def test_masked_padding_images_do_not_change_the_output():
  # The ignore slots hold -log(N * K) each, so their total mass does not depend on how many
  # image slots the batch is padded to.
  scale_sizes = (4, 2, 1)
  query, reference, values = _inputs(7, 2, 5, 5, scale_sizes)
  mask = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], np.float32)
  params = _params(scale_sizes)
  padded = _jitted_apply(scale_sizes)(params, query, reference, values, mask)
  unpadded = _jitted_apply(scale_sizes)(params, query, reference, values[:, :2], mask[:, :2])
  np.testing.assert_allclose(np.asarray(padded), np.asarray(unpadded), rtol=1e-5, atol=1e-5)


def test_relative_image_positions_count_back_from_the_latest_visible_image():
  mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(relative_image_positions(mask)),
                                [[3, 0, 2, 1, 0], [0, 0, 0, 0, 0]])


def test_bfloat16_inputs_give_bfloat16_outputs_within_bf16_tolerance():
  scale_sizes = (4, 2, 1)
  query, reference, values = _inputs(8, 2, 6, 3, scale_sizes)
  mask = _masks(8, 2, 6, 3, "3d")
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(scale_sizes))
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  output = _jitted_apply(scale_sizes, jnp.bfloat16)(params, bf16(query), reference, bf16(values),
                                                    mask)
  assert output.dtype == jnp.bfloat16
  # The float32 result on the same (bf16-rounded) numbers.
  as32 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32))  # noqa: E731
  expected = _reference(jax.tree.map(as32, params), as32(bf16(query)), reference,
                        as32(bf16(values)), mask, scale_sizes)
  _assert_close(output, expected, 3e-2)


def test_initialisation_follows_the_original():
  scale_sizes = (4, 2, 1)
  module = MMFS(query_dim=40, attention_dim=64, output_dim=48, scale_sizes=scale_sizes,
                base_spatial_shape=2, offset_init_magnitude=3.0, max_images=50)
  query, reference, values = _inputs(9, 1, 2, 1, scale_sizes)
  params = nn.meta.unbox(module.init(jax.random.key(3), np.ones((1, 2, 40), np.float32),
                                     reference, np.ones((1, 1, 21, 32), np.float32),
                                     np.ones((1, 1)))["params"])
  offsets = params["sampling_offsets"]
  assert not np.any(offsets["kernel"])
  assert np.abs(offsets["bias"]).max() <= 3.0 and np.abs(offsets["bias"]).max() > 2.5
  assert not np.any(params["attention_weights"]["bias"])
  assert np.any(params["attention_weights"]["kernel"])  # left at PyTorch's default
  assert not np.any(params["dynamic_offset_mask"]["bias"])
  for name in ("value_proj", "output_proj"):
    kernel = np.asarray(params[name]["kernel"])
    assert np.abs(kernel).max() <= np.sqrt(6.0 / sum(kernel.shape))  # xavier-uniform bound
    assert not np.any(params[name]["bias"])
  assert not np.any(params["ignore_token"])
  relpos = np.asarray(params["query_relpos"])
  assert relpos.shape == (50, 40) and 0.015 < relpos.std() < 0.025
  # PyTorch's Linear default for the kernels the original leaves alone: U(+-1/sqrt(fan_in)).
  kernel = np.asarray(params["dynamic_offset_mask"]["kernel"])
  assert np.abs(kernel).max() <= 1 / np.sqrt(40) and kernel.std() > 0.5 / np.sqrt(3 * 40)


def test_llm_config_initialises_the_unset_kernels_like_hugging_face_llama():
  config = mmi_13b.get_config().model.llm.mmfs
  module = MMFS.from_mapping(config, attention_dim=64, output_dim=256)
  params = nn.meta.unbox(module.init(
      jax.random.key(4), np.ones((1, 2, 256), np.float32), np.full((1, 2, 2), 0.5, np.float32),
      np.ones((1, 1, sum(s * s for s in config.scale_sizes), 64), np.float32),
      np.ones((1, 1)))["params"])
  for name in ("dynamic_offset_mask", "attention_weights"):
    std = np.asarray(params[name]["kernel"]).std()
    assert 0.018 < std < 0.022, (name, std)


def test_too_many_images_and_bad_masks_raise_clear_errors():
  scale_sizes = (4, 2, 1)
  module = _module(scale_sizes, max_images=4)
  query, reference, values = _inputs(10, 1, 2, 4, scale_sizes)
  with pytest.raises(ValueError, match="at most 3 images fit"):
    module.init(jax.random.key(0), query, reference, values, np.ones((1, 4)))
  module = _module(scale_sizes)
  with pytest.raises(ValueError, match="image_mask must be"):
    module.init(jax.random.key(0), query, reference, values, np.ones((1, 3)))
  with pytest.raises(ValueError, match="positions per image"):
    module.init(jax.random.key(0), query, reference, values[:, :, 1:], np.ones((1, 4)))


def _release_shapes(prefix):
  """The release's `{key after prefix: shape}` of one module."""
  if not SHAPES_13B.exists():
    pytest.skip(f"{SHAPES_13B} is not present")
  state = json.loads(SHAPES_13B.read_text())["state_dict"]
  return {k[len(prefix):]: tuple(v["shape"]) for k, v in state.items() if k.startswith(prefix)}


def test_llm_mmfs_of_the_13b_config_has_the_release_shapes():
  config = mmi_13b.get_config().model
  module = MMFS.from_mapping(config.llm.mmfs, attention_dim=config.vision_encoder.hidden_size,
                            output_dim=config.llm.hidden_size)
  positions = sum(s * s for s in config.llm.mmfs.scale_sizes)
  abstract = sharding.abstract_params(
      module, jax.ShapeDtypeStruct((1, 4, config.llm.hidden_size), jnp.float32),
      jax.ShapeDtypeStruct((1, 4, 2), jnp.float32),
      jax.ShapeDtypeStruct((1, 2, positions, config.vision_encoder.hidden_size), jnp.float32),
      jax.ShapeDtypeStruct((1, 2), jnp.float32))
  shapes = release_shapes_of(abstract)
  assert shapes["sampling_offsets.weight"] == (256, 5120)
  assert shapes["attention_weights.weight"] == (432, 5120)
  assert shapes["value_proj.weight"] == (1024, 1024)
  assert shapes["output_proj.weight"] == (5120, 1024)
  assert shapes["dynamic_offset_mask.weight"] == (5120, 5120)
  assert shapes["query_relpos.weight"] == (50, 5120)
  for layer in range(0, config.llm.num_layers, config.llm.mmfs.layer_frequency):
    assert shapes == _release_shapes(f"mm_decoder.layers.{layer}.llama_cross_attn.attn.")
