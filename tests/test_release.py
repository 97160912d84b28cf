"""The release checkpoint format: names and shapes at 13B, bitwise round trips, error reports,
and the command line."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util

from configs import mmi_13b, tiny
from mmi_jax import param_names, trainable
from mmi_jax.convert import __main__ as cli
from mmi_jax.convert import checkpoint_files, release
from mmi_jax.convert.torch_names import ConversionError
from mmi_jax.models.mm_interleaved import frozen_param_patterns
from random_params import random_params
from release_shapes import SHAPES_13B

PROGRAM = "mmi_jax.convert"

TINY = tiny.get_config().model


def flat(tree):
  return traverse_util.flatten_dict(tree)


def assert_bitwise_equal(actual, expected):
  actual, expected = flat(actual), flat(expected)
  assert actual.keys() == expected.keys()
  for path, value in expected.items():
    assert actual[path].dtype == value.dtype, path
    np.testing.assert_array_equal(actual[path].view(np.uint8), value.view(np.uint8),
                                  err_msg="/".join(path))


@pytest.fixture(scope="module")
def tiny_abstract():
  return release.param_shapes(TINY)


@pytest.fixture(scope="module")
def tiny_params(tiny_abstract):
  return random_params(tiny_abstract)


# --------------------------------------------------------------------------------------------
# 13B: names, shapes, counts and trainable flags, abstractly.


@pytest.fixture(scope="module")
def release_13b():
  return json.loads(SHAPES_13B.read_text())


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_expected_shapes_are_the_release_state_dict(release_13b):
  config = mmi_13b.get_config().model
  shapes = release.expected_shapes(config)
  state = release_13b["state_dict"]
  assert len(shapes) == release_13b["num_state_dict_entries"] == 2659
  assert shapes == {key: tuple(entry["shape"]) for key, entry in state.items()}
  params = sum(int(np.prod(shape)) for key, shape in shapes.items()
               if state[key]["kind"] == "parameter")
  assert params == release_13b["total_params"] == 14_912_865_561


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_trainable_params_are_the_release_requires_grad(release_13b):
  config = mmi_13b.get_config().model
  abstract = release.param_shapes(config)
  mask = trainable.unfrozen_mask(abstract, frozen_param_patterns(config))
  assert trainable.count_params(abstract, mask) == release_13b["trainable_params"]
  ours = {param_names.release_name(path): trains for path, trains in flat(mask).items()}
  state = release_13b["state_dict"]
  assert ours == {key: entry["requires_grad"] for key, entry in state.items()
                  if entry["kind"] == "parameter"}


# --------------------------------------------------------------------------------------------
# Round trips and what is written.


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_save_then_load_is_bitwise_identical(tmp_path, tiny_abstract, dtype):
  params = random_params(tiny_abstract, seed=1, dtype=dtype)
  files = release.save(params, TINY, tmp_path, max_shard_bytes=2**20, progress=False)
  assert (tmp_path / "model.safetensors.index.json") in files and len(files) > 2
  loaded = release.load(tmp_path, TINY, dtype=dtype, progress=False)
  assert_bitwise_equal(loaded, params)


def test_saved_names_shapes_and_buffers_are_the_expected_ones(tmp_path, tiny_params):
  release.save(tiny_params, TINY, tmp_path, progress=False)
  tensors = checkpoint_files.open_checkpoint(tmp_path)
  shapes = {key: tuple(tensors[key].shape) for key in tensors.keys()}
  assert shapes == release.expected_shapes(TINY)
  np.testing.assert_array_equal(tensors[release.CLIP_MEAN].ravel(),
                                np.float32(TINY.vision_encoder.pixel_mean))
  assert tensors[release.POSITION_IDS].dtype == np.int64
  # An MMFS layer's special names and layouts.
  relpos = tiny_params["mm_decoder"]["layers_0"]["llama_cross_attn"]["attn"]["query_relpos"]
  np.testing.assert_array_equal(
      tensors["mm_decoder.layers.0.llama_cross_attn.attn.query_relpos.weight"], relpos)
  ignore = tiny_params["mm_decoder"]["layers_0"]["llama_cross_attn"]["attn"]["ignore_token"]
  assert tensors["mm_decoder.layers.0.llama_cross_attn.attn.ignore_token"].shape == (
      (1, 1, 1) + ignore.shape)
  kernel = tiny_params["context_feat_proj"]["kernel"]
  np.testing.assert_array_equal(tensors["context_feat_proj.weight"], kernel.T)


def test_a_torch_bin_state_dict_loads(tmp_path, tiny_params):
  """The release's own format: `torch.save(model.state_dict())`, read with weights_only."""
  state = {key: torch.from_numpy(np.ascontiguousarray(value))
           for key, value in release.state_dict_items(tiny_params, TINY, check=False)}
  torch.save(state, tmp_path / "pytorch_model.bin")
  loaded = release.load(tmp_path / "pytorch_model.bin", TINY, progress=False)
  assert_bitwise_equal(loaded, tiny_params)


# --------------------------------------------------------------------------------------------
# Errors.


def test_missing_unexpected_and_mis_shaped_keys_are_all_named_in_one_error(tmp_path,
                                                                          tiny_params):
  state = dict(release.state_dict_items(tiny_params, TINY, check=False))
  del state["soi_token"]
  del state["image_decoder.decoder.unet.conv_in.weight"]
  state["image_decoder.decoder.mmfs_module.extra.weight"] = np.zeros(3, np.float32)
  state["context_feat_proj.bias"] = np.zeros(7, np.float32)
  checkpoint_files.write_checkpoint(tmp_path, state.items())
  with pytest.raises(ConversionError) as error:
    release.load(tmp_path, TINY, progress=False)
  message = str(error.value)
  for expected in ("2 missing", "soi_token", "image_decoder.decoder.unet.conv_in.weight",
                   "1 unexpected", "image_decoder.decoder.mmfs_module.extra.weight",
                   "1 shape mismatch", "context_feat_proj.bias: file (7,)"):
    assert expected in message


def test_a_truncated_checkpoint_fails_with_a_clear_message(tmp_path, tiny_params):
  (file,) = release.save(tiny_params, TINY, tmp_path, progress=False)
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(checkpoint_files.CheckpointFileError, match="truncated or corrupt"):
    release.load(tmp_path, TINY, progress=False)
  (tmp_path / "broken.bin").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(checkpoint_files.CheckpointFileError, match="broken.bin"):
    release.load(tmp_path / "broken.bin", TINY, progress=False)


def test_a_tensor_of_another_kind_and_a_shard_outside_the_checkpoint_are_refused(tmp_path,
                                                                                tiny_params):
  """Every loader reads through `params_from_state_dict` and `open_checkpoint`: an integer or
  bool tensor for a float param (or the reverse) is named, not cast; an index whose shard
  path leaves the checkpoint's directory is refused before anything is read."""
  (file,) = release.save(tiny_params, TINY, tmp_path / "kinds", progress=False)
  tensors = {key: checkpoint_files.open_checkpoint(file)[key]
             for key in checkpoint_files.open_checkpoint(file).keys()}
  float_key = next(key for key, value in tensors.items() if value.dtype == np.float32)
  tensors[float_key] = tensors[float_key].astype(np.int32)
  checkpoint_files.write_checkpoint(tmp_path / "kinds", tensors.items())
  with pytest.raises(ConversionError, match=rf"{re.escape(float_key)}: file int32 \(integer\) "
                     r"for a float32 param"):
    release.load(tmp_path / "kinds", TINY, progress=False)
  outside = tmp_path / "outside.safetensors"
  outside.write_bytes(file.read_bytes())
  index = tmp_path / "escape" / "model.safetensors.index.json"
  index.parent.mkdir()
  index.write_text(json.dumps({"weight_map": {float_key: "../outside.safetensors"}}))
  with pytest.raises(checkpoint_files.CheckpointFileError,
                     match=r"shard '\.\./outside\.safetensors' .* leaves"):
    release.load(index, TINY, progress=False)


def test_saving_params_of_another_architecture_names_the_differences(tmp_path, tiny_params):
  params = flat(tiny_params)
  params[("context_feat_proj", "kernel")] = np.zeros((3, 3), np.float32)
  del params[("soi_token",)]
  with pytest.raises(ConversionError, match=r"(?s)1 missing:\n    soi_token.*"
                     r"context_feat_proj/kernel: params \(3, 3\)"):
    release.save(traverse_util.unflatten_dict(params), TINY, tmp_path, progress=False)
  assert not list(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------------------------
# The command line.


def test_command_line_round_trip_through_orbax(tmp_path, tiny_params, capsys):
  source = tmp_path / "release"
  release.save(tiny_params, TINY, source, progress=False)
  config = "configs/tiny.py"
  cli.main([PROGRAM, "release-to-jax", str(source), str(tmp_path / "orbax"),
            f"--config={config}", "--noprogress"])
  cli.main([PROGRAM, "jax-to-release", str(tmp_path / "orbax"), str(tmp_path / "back"),
            f"--config={config}", "--dtype=bfloat16", "--noprogress"])
  back = checkpoint_files.open_checkpoint(tmp_path / "back")
  original = checkpoint_files.open_checkpoint(source)
  assert set(back.keys()) == set(original.keys())
  for key in original.keys():
    expected = original[key]
    if key not in release.buffers(TINY):  # buffers keep the release's dtypes
      expected = expected.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back[key], expected, err_msg=key)
  cli.main([PROGRAM, "count", f"--config={config}"])
  printed = capsys.readouterr().out
  total = sum(int(np.prod(shape)) for key, shape in release.expected_shapes(TINY).items()
              if key not in release.buffers(TINY))
  assert f"{total:,} parameters" in printed and "trainable" in printed
