"""Deformable DETR's multi-scale deformable attention against a PyTorch reference."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import mmi_13b
from mmi_jax import sharding
from mmi_jax.models.deformable_attention import MultiScaleDeformableAttention
from test_mmfs import SHAPES_13B
from torch_references import ms_deform_attn_reference

SPATIAL_SHAPES = ((6, 6), (3, 4), (2, 1))
EMBED, HEADS, POINTS = 32, 4, 3


def _setup(seed, reference_width, per_level_reference):
  rng = np.random.default_rng(seed)
  batch, queries = 2, 7
  length = sum(h * w for h, w in SPATIAL_SHAPES)
  query = rng.standard_normal((batch, queries, EMBED)).astype(np.float32)
  values = rng.standard_normal((batch, length, EMBED)).astype(np.float32)
  levels = len(SPATIAL_SHAPES) if per_level_reference else 1
  reference = rng.uniform(0, 1, (batch, queries, levels, reference_width)).astype(np.float32)
  padding = rng.uniform(size=(batch, length)) < 0.2
  module = MultiScaleDeformableAttention(EMBED, num_levels=len(SPATIAL_SHAPES), num_heads=HEADS,
                                         num_points=POINTS, value_ratio=0.5)
  params = nn.meta.unbox(module.init(jax.random.key(seed), query, reference, values,
                                     SPATIAL_SHAPES, padding)["params"])
  # Perturb: at init the offset kernel and the attention logits are zero.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  return module, params, (query, reference, values, padding)


@pytest.mark.parametrize("reference_width,per_level", [(2, False), (2, True), (4, True)],
                         ids=["shared-points", "per-level-points", "boxes"])
def test_matches_ms_deform_attn_reference(reference_width, per_level):
  module, params, (query, reference, values, padding) = _setup(0, reference_width, per_level)
  output = jax.jit(lambda p, *a: module.apply({"params": p}, *a[:3], SPATIAL_SHAPES, a[3]))(
      params, query, reference, values, padding)
  as64 = lambda x: torch.tensor(np.asarray(x, np.float64))  # noqa: E731
  torch_params = {f"{name}.weight": as64(params[name]["kernel"]).T for name in params}
  torch_params.update({f"{name}.bias": as64(params[name]["bias"]) for name in params})
  expected = ms_deform_attn_reference(
      torch_params, as64(query), as64(reference), as64(values), SPATIAL_SHAPES,
      num_heads=HEADS, num_levels=len(SPATIAL_SHAPES), num_points=POINTS,
      padding_mask=torch.tensor(padding)).numpy()
  error = np.abs(np.asarray(output, np.float64) - expected).max() / np.abs(expected).max()
  assert error <= 1e-5, error


def test_offsets_start_on_the_deformable_detr_grid():
  module, _, (query, reference, values, _) = _setup(1, 2, False)
  params = nn.meta.unbox(module.init(jax.random.key(0), query, reference, values,
                                     SPATIAL_SHAPES)["params"])
  bias = np.asarray(params["sampling_offsets"]["bias"]).reshape(HEADS, len(SPATIAL_SHAPES),
                                                                  POINTS, 2)
  # Head 0 points along +x, head 1 (90 degrees) along +y; point p is p + 1 pixels away.
  np.testing.assert_allclose(bias[0, 0], [[1, 0], [2, 0], [3, 0]], atol=1e-6)
  np.testing.assert_allclose(bias[1, 2], [[0, 1], [0, 2], [0, 3]], atol=1e-6)
  assert not np.any(params["attention_weights"]["kernel"])
  assert not np.any(params["sampling_offsets"]["kernel"])


def test_adapter_attention_of_the_13b_config_has_the_release_shapes():
  if not SHAPES_13B.exists():
    pytest.skip(f"{SHAPES_13B} is not present")
  state_dict = json.loads(SHAPES_13B.read_text())["state_dict"]
  config = mmi_13b.get_config().model
  width = config.vision_encoder.hidden_size
  adapter = config.vision_adapter
  prefix = "visual_tokenizer.encoder.vision_model.adapter_interactions.0."
  for part, levels in (("injector", 3), ("extractor", 1)):
    module = MultiScaleDeformableAttention(
        width, num_levels=levels, num_heads=adapter.num_heads, num_points=adapter.num_points,
        value_ratio=adapter.value_ratio)
    shapes = ((4, 4),) * levels
    abstract = sharding.abstract_params(
        module, jax.ShapeDtypeStruct((1, 3, width), jnp.float32),
        jax.ShapeDtypeStruct((1, 3, 1, 2), jnp.float32),
        jax.ShapeDtypeStruct((1, 16 * levels, width), jnp.float32), spatial_shapes=shapes)
    for name, leaves in nn.meta.unbox(abstract).items():
      assert tuple(state_dict[f"{prefix}{part}.attn.{name}.weight"]["shape"]) == (
          leaves["kernel"].shape[::-1])
      assert tuple(state_dict[f"{prefix}{part}.attn.{name}.bias"]["shape"]) == (
          leaves["bias"].shape)
