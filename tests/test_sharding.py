"""Mesh construction, logical-axis rules, and sharded MMFS on 8 simulated CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from mmi_jax import sharding
from mmi_jax.models.deformable_attention import MultiScaleDeformableAttention
from mmi_jax.models.mmfs import MMFS


def test_eight_simulated_devices_are_available():
  assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count"


def test_make_mesh_fills_the_remaining_devices():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  mesh = sharding.make_mesh((1, -1, 1), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  mesh = sharding.make_mesh(tiny.get_config().mesh, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("shape,message", [
    (dict(data=3, fsdp=1, tensor=1), "needs 3 devices"),
    (dict(data=-1, fsdp=3, tensor=1), "cannot be split"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
    (dict(data=2, model=4), "unknown axes"),
])
def test_make_mesh_rejects_impossible_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_logical_rules_replicate_dims_the_mesh_does_not_divide():
  sizes = {"data": 2, "fsdp": 2, "tensor": 4}
  assert sharding.logical_to_spec(("embed", "heads"), (64, 256), sizes) == PartitionSpec(
      "fsdp", "tensor")
  # 32002 rows do not split 4 ways; 10 rows are never split.
  assert sharding.logical_to_spec(("heads", "embed"), (32002, 64), sizes) == PartitionSpec(
      None, "fsdp")
  assert sharding.logical_to_spec(("image_slots", "embed"), (10, 64), sizes) == PartitionSpec(
      None, "fsdp")
  # Both dims named for fsdp: the first takes it, the second stays whole.
  assert sharding.logical_to_spec(("embed", "vision_embed"), (64, 64), sizes) == PartitionSpec(
      "fsdp", None)
  with pytest.raises(ValueError, match="do not match shape"):
    sharding.logical_to_spec(("embed",), (4, 4), sizes)


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((4, 8))
  assert sharding.constrain(x, ("activation_batch", None)) is x


def _mmfs_setup():
  config = tiny.get_config().model
  module = MMFS.from_mapping(config.llm.mmfs, attention_dim=config.vision_encoder.hidden_size,
                            output_dim=config.llm.hidden_size)
  rng = np.random.default_rng(0)
  batch, queries, images = 4, 8, 3
  positions = sum(s * s for s in config.llm.mmfs.scale_sizes)
  query = rng.standard_normal((batch, queries, config.llm.hidden_size)).astype(np.float32)
  reference = np.full((1, queries, 2), 0.5, np.float32)
  values = rng.standard_normal((batch, images, positions,
                                config.vision_encoder.hidden_size)).astype(np.float32)
  mask = rng.integers(0, 2, (batch, queries, images)).astype(np.float32)
  return module, (query, reference, values, mask)


def test_mmfs_sharded_over_a_2x2x2_mesh_equals_one_device():
  module, inputs = _mmfs_setup()
  params = nn.meta.unbox(module.init(jax.random.key(0), *inputs)["params"])
  # Non-zero offsets and ignore token, so every parameter matters.
  params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  apply = lambda p, *a: module.apply({"params": p}, *a)  # noqa: E731
  expected = jax.jit(apply)(params, *inputs)

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  param_shardings = sharding.param_shardings(sharding.abstract_params(module, *inputs), mesh)
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  input_shardings = (batch_sharding, NamedSharding(mesh, PartitionSpec()), batch_sharding,
                     batch_sharding)
  sharded_params = jax.device_put(params, param_shardings)
  sharded_inputs = jax.device_put(inputs, input_shardings)
  with sharding.use_mesh(mesh):
    output = jax.jit(apply, in_shardings=(param_shardings, *input_shardings),
                     out_shardings=batch_sharding)(sharded_params, *sharded_inputs)
  np.testing.assert_allclose(np.asarray(output), np.asarray(expected), rtol=1e-5, atol=1e-5)

  # The params really are split: width 64 over fsdp=2, head-major dims over tensor=2.
  shard_shapes = sharding.shard_shapes(sharded_params)
  assert shard_shapes["dynamic_offset_mask"]["kernel"] == (32, 32)
  assert shard_shapes["sampling_offsets"]["kernel"] == (32, 128)
  assert shard_shapes["attention_weights"]["kernel"] == (32, 216)
  assert shard_shapes["value_proj"]["kernel"] == (32, 32)
  assert shard_shapes["output_proj"]["kernel"] == (32, 32)
  assert shard_shapes["query_relpos"] == (50, 32)
  assert shard_shapes["ignore_token"] == (32,)
  assert output.sharding.spec == batch_sharding.spec


def test_init_sharded_creates_params_in_place_from_the_same_random_stream():
  module, inputs = _mmfs_setup()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  params, shardings = sharding.init_sharded(module, jax.random.key(1), mesh, *inputs)
  reference = nn.meta.unbox(module.init(jax.random.key(1), *inputs)["params"])
  for got, want, placed in zip(jax.tree.leaves(params), jax.tree.leaves(reference),
                               jax.tree.leaves(shardings)):
    assert got.sharding == placed
    # Same key, same draws; jit may fuse the truncated normal's erfinv differently from the
    # eager init, so allow an ulp.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def test_deformable_attention_sharded_equals_one_device():
  module = MultiScaleDeformableAttention(64, num_levels=2, num_heads=4, num_points=4,
                                         value_ratio=0.5)
  rng = np.random.default_rng(1)
  spatial_shapes = ((4, 4), (2, 2))
  query = rng.standard_normal((4, 6, 64)).astype(np.float32)
  reference = rng.uniform(size=(1, 6, 1, 2)).astype(np.float32)
  values = rng.standard_normal((4, 20, 64)).astype(np.float32)
  apply = lambda p, q, r, v: module.apply({"params": p}, q, r, v, spatial_shapes)  # noqa: E731
  params = nn.meta.unbox(module.init(jax.random.key(0), query, reference, values,
                                     spatial_shapes)["params"])
  params = jax.tree.map(lambda p: p + 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  expected = jax.jit(apply)(params, query, reference, values)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding.param_shardings(
      sharding.abstract_params(module, query, reference, values, spatial_shapes=spatial_shapes),
      mesh)
  with sharding.use_mesh(mesh):
    output = jax.jit(apply)(jax.device_put(params, shardings), query, reference, values)
  np.testing.assert_allclose(np.asarray(output), np.asarray(expected), rtol=1e-5, atol=1e-5)
