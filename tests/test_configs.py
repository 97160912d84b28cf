"""The released configuration's numbers, and the tiny config's sameness of architecture."""

import pytest

from configs import mmi_13b, tiny
from mmi_jax.train.config_check import flat_keys as _flat_keys


def test_tiny_has_exactly_the_fields_of_the_release():
  assert _flat_keys(tiny.get_config()) == _flat_keys(mmi_13b.get_config())


def test_13b_config_holds_the_numbers_of_spec():
  model = mmi_13b.get_config().model
  tokens = model.tokens
  assert (tokens.vocab_size, tokens.bos_id, tokens.eos_id, tokens.pad_id, tokens.soi_id,
          tokens.image_id, tokens.tokens_per_image) == (32002, 1, 2, 31999, 32000, 32001, 64)
  vision = model.vision_encoder
  assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_layers,
          vision.num_heads, vision.mlp_dim) == (224, 14, 1024, 24, 16, 4096)
  adapter = model.vision_adapter
  assert (adapter.num_points, adapter.value_ratio, adapter.conv_inplane,
          adapter.prior_image_size) == (4, 0.5, 64, 256)
  assert adapter.interaction_indexes == ((0, 5), (6, 11), (12, 17), (18, 23))
  qformer = model.visual_tokenizer.qformer
  assert (qformer.num_queries, qformer.hidden_size, qformer.num_layers, qformer.num_heads,
          qformer.cross_attention_frequency, qformer.qk_normalization) == (64, 768, 12, 12, 2,
                                                                           True)
  llm = model.llm
  assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.mlp_dim, llm.rms_norm_eps,
          llm.rope_theta) == (5120, 40, 40, 13824, 1e-6, 10000.0)
  mmfs = llm.mmfs
  assert (mmfs.layer_frequency, mmfs.num_heads, mmfs.num_points, mmfs.scale_sizes,
          mmfs.base_spatial_shape, mmfs.offset_init_magnitude, mmfs.max_images) == (
              4, 16, 8, (32, 16, 8), 16, 3.0, 50)
  assert (model.text_head.new_token_bias, model.text_head.head_new_bias) == (-100.0, 95.0)
  decoder = model.image_decoder
  assert (decoder.image_size, decoder.uncond_prob, decoder.qformer.num_queries,
          decoder.qformer.hidden_size, decoder.qformer.num_heads) == (512, 0.1, 77, 1024, 16)
  assert decoder.unet.block_out_channels == (320, 640, 1280, 1280)
  assert decoder.unet.attention_head_dim == (5, 10, 20, 20)
  assert decoder.vae.scaling_factor == 0.18215
  schedule = decoder.noise_schedule
  assert (schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end) == (
      1000, 0.00085, 0.012)
  net = decoder.mmfs
  assert (net.attention_dim, net.num_heads, net.num_points, net.scale_sizes,
          net.offset_init_magnitude, net.max_images) == (1024, 16, 8, (64, 32, 16, 8), 1.0, 10)
  assert net.base_spatial_shapes == (64,) * 3 + (32,) * 3 + (16,) * 3 + (8,) * 3
  assert net.mid_base_spatial_shape == 8
  assert (model.loss.text_weight, model.loss.image_weight) == (1.0, 10.0)
  train = mmi_13b.get_config().train
  assert (train.learning_rate, train.adam_b1, train.adam_b2, train.adam_eps, train.weight_decay,
          train.warmup_steps, train.steps) == (1e-4, 0.9, 0.995, 1e-6, 0.05, 1000, 15000)


@pytest.mark.parametrize("get_config", [mmi_13b.get_config, tiny.get_config],
                         ids=["mmi_13b", "tiny"])
def test_spatial_sizes_agree_across_components(get_config):
  model = get_config().model
  grid = model.vision_encoder.image_size // model.vision_encoder.patch_size
  # The adapter's maps are 4x, 2x, 1x and 0.5x the patch grid; the LLM samples the last three.
  adapter_sizes = (4 * grid, 2 * grid, grid, grid // 2)
  assert model.vision_adapter.prior_image_size == 16 * grid
  assert tuple(model.llm.mmfs.scale_sizes) == adapter_sizes[1:]
  assert model.llm.mmfs.base_spatial_shape == grid
  assert model.visual_tokenizer.pos_grid_size == grid
  assert model.visual_tokenizer.qformer.num_queries == model.tokens.tokens_per_image
  # The UNet's latent is the decoder image / 2**(VAE levels - 1); its residual maps halve per
  # down block; MMFSNet's base shapes follow them, and it samples the adapter's 4 maps.
  unet = model.image_decoder.unet
  vae_factor = 2 ** (len(model.image_decoder.vae.block_out_channels) - 1)
  assert unet.sample_size == model.image_decoder.image_size // vae_factor
  net = model.image_decoder.mmfs
  assert tuple(net.scale_sizes) == adapter_sizes
  blocks = len(unet.block_out_channels)
  expected_bases = tuple(unet.sample_size // 2**i for i in range(blocks) for _ in range(3))
  assert tuple(net.base_spatial_shapes) == expected_bases
  assert net.mid_base_spatial_shape == unet.sample_size // 2**(blocks - 1)
  assert net.pos_grid_size == unet.sample_size
  assert model.image_decoder.qformer.hidden_size == unet.cross_attention_dim
  # MMFS splits its width into its heads.
  assert model.vision_encoder.hidden_size % model.llm.mmfs.num_heads == 0
  assert net.attention_dim % net.num_heads == 0


def test_tiny_keeps_the_mmfs_head_and_point_counts():
  released, small = mmi_13b.get_config().model, tiny.get_config().model
  for path in ("llm.mmfs", "image_decoder.mmfs"):
    a, b = released, small
    for part in path.split("."):
      a, b = a[part], b[part]
    assert (a.num_heads, a.num_points) == (b.num_heads, b.num_points) == (16, 8)
  assert small.vision_encoder.num_layers == 24
  assert small.llm.num_layers // small.llm.mmfs.layer_frequency >= 2
