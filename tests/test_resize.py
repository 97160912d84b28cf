"""Resizing against `torch.nn.functional.interpolate` (no antialiasing), and the sin-cos table."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmi_jax.models.sincos import sincos_2d
from mmi_jax.ops.resize import resize
from torch_vision_references import sincos_2d_reference


def _torch_resize(x, **kwargs):
  nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
  return F.interpolate(nchw, **kwargs).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("in_size,out_size,align_corners", [
    (16, 64, False), (16, 32, False), (16, 8, False), (16, 16, False), (7, 12, False),
    (16, 24, True), (5, 3, True),
], ids=lambda v: str(v))
def test_bicubic_matches_torch(in_size, out_size, align_corners):
  x = np.random.default_rng(in_size * out_size).standard_normal((2, in_size, in_size + 1, 6))
  x = x.astype(np.float32)
  ours = jax.jit(lambda a: resize(a, (out_size, out_size + 2), mode="bicubic",
                                  align_corners=align_corners))(x)
  expected = _torch_resize(x, size=(out_size, out_size + 2), mode="bicubic",
                           align_corners=align_corners)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_bicubic_differs_from_jax_image_resize():
  """The reason this op exists: jax.image.resize's cubic uses a = -0.5."""
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)
  ours = np.asarray(resize(x, (64, 64), mode="bicubic"))
  theirs = np.asarray(jax.image.resize(x, (1, 64, 64, 4), "bicubic"))
  assert np.abs(ours - theirs).max() > 1e-3


@pytest.mark.parametrize("scale_factor", [4, 2, 0.5])
def test_bilinear_scale_factors_match_torch(scale_factor):
  x = np.random.default_rng(1).standard_normal((3, 8, 8, 5)).astype(np.float32)
  ours = jax.jit(lambda a: resize(a, scale_factor=scale_factor))(x)
  expected = _torch_resize(x, scale_factor=scale_factor, mode="bilinear", align_corners=False)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_size,out_size,align_corners", [
    ((224, 224), (256, 256), False),  # the adapter's prior-module input
    ((7, 6), (5, 9), False), ((7, 6), (5, 9), True),
], ids=lambda v: str(v))
def test_bilinear_sizes_match_torch(in_size, out_size, align_corners):
  x = np.random.default_rng(2).standard_normal((2, *in_size, 3)).astype(np.float32)
  ours = resize(x, out_size, mode="bilinear", align_corners=align_corners)
  expected = _torch_resize(x, size=out_size, mode="bilinear", align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_resize_rejects_bad_arguments():
  x = np.zeros((1, 4, 4, 2), np.float32)
  with pytest.raises(ValueError, match="exactly one"):
    resize(x, (2, 2), scale_factor=2)
  with pytest.raises(ValueError, match="unknown mode"):
    resize(x, (2, 2), mode="nearest")
  with pytest.raises(ValueError, match=r"\[..., H, W, C\]"):
    resize(np.zeros((4, 4), np.float32), (2, 2))


def test_sincos_table_matches_its_definition():
  table = sincos_2d(64, 5, cls_token=True)
  assert table.shape == (26, 64) and table.dtype == np.float32
  np.testing.assert_allclose(table, sincos_2d_reference(64, 5), rtol=0, atol=1e-6)
