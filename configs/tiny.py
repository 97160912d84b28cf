"""The released architecture with tiny widths, for tests and CPU runs.

It is `mmi_13b.py` with its sizes shrunk and nothing else changed: the same components, layer
pattern (24 ViT layers in 4 interaction blocks, MMFS every 4th LLM layer, 12 + 1 MMFSNet
blocks), the same MMFS head and point counts (16 heads, 8 points), ids, losses and recipe.
Image sizes shrink too, so the multi-scale maps are (16, 8, 4, 2) instead of (64, 32, 16, 8).
"""

import ml_collections

from configs import mmi_13b


def get_config() -> ml_collections.ConfigDict:
  config = mmi_13b.get_config()
  config.name = "tiny"
  model = config.model
  model.dtype = "float32"

  model.tokens.tokens_per_image = 8
  model.tokens.max_sequence_length = 256

  # 56 / 14 = a 4 x 4 patch grid; the adapter's conv stem sees 64 x 64 -> maps 16, 8, 4, 2.
  model.vision_encoder.update(image_size=56, hidden_size=64, num_heads=4, mlp_dim=128)
  model.vision_adapter.update(prior_image_size=64, conv_inplane=8, num_heads=4)

  model.visual_tokenizer.pos_grid_size = 4
  model.visual_tokenizer.qformer.update(num_queries=8, hidden_size=32, num_layers=2,
                                        num_heads=2, mlp_dim=64)

  model.llm.update(hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=4, mlp_dim=128,
                   max_position_embeddings=256)
  model.llm.mmfs.update(scale_sizes=(8, 4, 2), base_spatial_shape=4)

  model.image_decoder.update(image_size=64, context_pos_length=256, max_context_length=256)
  model.image_decoder.qformer.update(num_queries=8, hidden_size=32, num_heads=2, mlp_dim=64)
  model.image_decoder.unet.update(sample_size=8, block_out_channels=(32, 32, 64, 64),
                                  attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32,
                                  norm_num_groups=8)
  model.image_decoder.vae.update(block_out_channels=(8, 16, 16, 16), norm_num_groups=8)
  model.image_decoder.mmfs.update(
      attention_dim=64, scale_sizes=(16, 8, 4, 2),
      base_spatial_shapes=(8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1), mid_base_spatial_shape=1,
      pos_grid_size=8)
  return config
