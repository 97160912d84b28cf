"""PyTorch references of MM-Interleaved's three parts, built from a model config, for the tests.

  * the visual tokenizer (SPEC 3, 4): `torch_vision_references` (transformers' CLIP layers,
    ViT-Adapter, Q-Former), `visual_tokenizer_reference`;
  * the LLM with MMFS and the text head (SPEC 5): transformers' `LlamaModel` layers and
    `torch_references.mmfs_reference`, `llama_reference` + `multimodal_lm_reference`;
  * the image decoder's diffusion loss (SPEC 7): diffusers' `UNet2DConditionModel`,
    `AutoencoderKL` and `DDPMScheduler`, transformers' `Blip2QFormerModel` and
    `torch_references.mmfs_block_reference`, `image_decoder_modules` +
    `image_decoder_loss_reference`.

State dicts are the release's (`mm_decoder.layers.0.llama_cross_attn.attn.query_relpos.weight`,
...). Config sections are read as plain attributes; nothing here imports mmi_jax.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import Blip2QFormerConfig, CLIPVisionConfig

import torch_vision_references as vision_ref
from torch_references import mmfs_block_reference, mmfs_reference


def visual_tokenizer_reference(model_config) -> vision_ref.VisualTokenizer:
  """The visual tokenizer of `config.model` (torch's default init, eval mode); its
  `state_dict()` keys are the release's after `visual_tokenizer.`."""
  vision, adapter = model_config.vision_encoder, model_config.vision_adapter
  section = model_config.visual_tokenizer
  clip_config = CLIPVisionConfig(
      hidden_size=vision.hidden_size, intermediate_size=vision.mlp_dim,
      num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
      image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.activation,
      layer_norm_eps=vision.layer_norm_eps)
  encoder = vision_ref.ViTAdapter(
      clip_config, interaction_indexes=adapter.interaction_indexes,
      conv_inplane=adapter.conv_inplane, adapter_heads=adapter.num_heads,
      points=adapter.num_points, ratio=adapter.value_ratio, ffn_ratio=adapter.ffn_ratio,
      eps=adapter.layer_norm_eps, extra=adapter.extra_extractors)
  qformer = section.qformer
  qformer_config = Blip2QFormerConfig(
      hidden_size=qformer.hidden_size, num_hidden_layers=qformer.num_layers,
      num_attention_heads=qformer.num_heads, intermediate_size=qformer.mlp_dim,
      cross_attention_frequency=qformer.cross_attention_frequency,
      encoder_hidden_size=vision.hidden_size, layer_norm_eps=qformer.layer_norm_eps)
  tokenizer = vision_ref.VisualTokenizer(
      encoder, qformer_config, num_queries=qformer.num_queries,
      qk_normalization=qformer.qk_normalization, llm_width=model_config.llm.hidden_size,
      pos_grid=section.pos_grid_size)
  return tokenizer.eval()


# --------------------------------------------------------------------------------------------
# The LLM: Hugging Face's Llama layers plus SPEC section 5 by hand.


def llama_reference(model_config, state) -> transformers.LlamaModel:
  """transformers' `LlamaModel` of `config.model.llm`, loaded from the `mm_decoder.` keys of a
  release state dict (torch tensors) except the MMFS layers (`llama_cross_attn`)."""
  llm = model_config.llm
  config = transformers.LlamaConfig(
      vocab_size=model_config.tokens.vocab_size, hidden_size=llm.hidden_size,
      num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
      num_key_value_heads=llm.num_kv_heads, intermediate_size=llm.mlp_dim,
      rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
      max_position_embeddings=llm.max_position_embeddings, attn_implementation="eager")
  model = transformers.LlamaModel(config).eval()
  prefix = "mm_decoder."
  llama = {key[len(prefix):]: value for key, value in state.items()
           if key.startswith(prefix) and "llama_cross_attn" not in key}
  missing, unexpected = model.load_state_dict(llama, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  return model


def _rms(x, weight, eps):
  return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def multimodal_lm_reference(llama, state, model_config, row_ids, image_embeds, image_features):
  """SPEC section 5 for one sequence alone (a batch of one, as the release would run it).

  Args:
    llama: `llama_reference(model_config, state)`.
    state: the release state dict (torch tensors): `soi_token`, `mm_decoder.layers.N.
      llama_cross_attn.*`, `text_decoder.head.*`, `text_decoder.head_new.*`.
    row_ids: the sequence's token ids (a list, no padding).
    image_embeds: `[N, T, D]` the row's images' visual tokens, in order.
    image_features: `[N, S, Dv]` their multi-scale maps of the MMFS sizes, flattened.
  Returns:
    `(hidden [L, D] the last hidden states (after the final norm), logits [L, V],
      image_mask [L, N])` as torch tensors.
  """
  tokens, llm = model_config.tokens, model_config.llm
  mmfs, eps = llm.mmfs, llm.rms_norm_eps
  width = llm.hidden_size
  ids = torch.tensor(row_ids)[None]
  length = ids.shape[1]
  with torch.no_grad():
    hidden = llama.embed_tokens(ids)
    # <|image|> positions take the images' embeddings in order; soi gets soi_token added.
    image_positions = [t for t in range(length) if row_ids[t] == tokens.image_id]
    hidden[0, image_positions] = torch.as_tensor(image_embeds).reshape(-1, width)
    soi_positions = [t for t in range(length) if row_ids[t] == tokens.soi_id]
    hidden[0, soi_positions] += state["soi_token"][0]
    # Cross-attention mask: image n starts at its soi + 1, visible iff nearest_bos < p <= t.
    nearest_bos, last = [], -1
    for t in range(length):
      last = t if row_ids[t] == tokens.bos_id else last
      nearest_bos.append(last)
    starts = [p + 1 for p in soi_positions]
    image_mask = torch.tensor([[float(nearest_bos[t] < p <= t) for p in starts]
                               for t in range(length)]).reshape(1, length, len(starts))
    position_ids = torch.arange(length)[None]
    cos_sin = llama.rotary_emb(hidden, position_ids)
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    values = torch.as_tensor(image_features)[None]
    for index, layer in enumerate(llama.layers):
      attended, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin,
                                    attention_mask=causal)
      hidden = hidden + attended
      if index % mmfs.layer_frequency == 0:
        prefix = f"mm_decoder.layers.{index}.llama_cross_attn."
        attn = {k[len(prefix + "attn."):]: v for k, v in state.items()
                if k.startswith(prefix + "attn.")}
        query = _rms(hidden, state[prefix + "norm1.weight"], eps)
        normed_values = _rms(values, state[prefix + "norm2.weight"], eps)
        reference = torch.tensor(mmfs.reference_point, dtype=torch.float32).expand(1, length, 2)
        sampled = mmfs_reference(attn, query, reference, normed_values, image_mask,
                                 num_heads=mmfs.num_heads, num_points=mmfs.num_points,
                                 scale_sizes=tuple(mmfs.scale_sizes),
                                 base_spatial_shape=mmfs.base_spatial_shape)
        hidden = hidden + torch.tanh(state[prefix + "gate"]) * sampled
      hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = llama.norm(hidden)
    logits = hidden @ state["text_decoder.head.weight"].T + state["text_decoder.head.bias"]
    logits[..., tokens.text_vocab_size:] += (hidden @ state["text_decoder.head_new.weight"].T
                                             + state["text_decoder.head_new.bias"])
  return hidden[0], logits[0], image_mask[0]


# --------------------------------------------------------------------------------------------
# The image decoder's loss: diffusers and transformers modules, MMFS residuals as ControlNet
# residuals.


def image_decoder_modules(decoder_config, context_width):
  """`(unet, vae, qformer)`: diffusers' and transformers' modules of the image decoder section
  (`ImageDecoderConfig`-like: `unet`, `vae`, `qformer` dataclasses), torch's default init, in
  construction order (the global torch RNG draws them)."""
  unet = UNet2DConditionModel(**dataclasses.asdict(decoder_config.unet)).eval()
  blocks = len(decoder_config.vae.block_out_channels)
  vae = AutoencoderKL(**dataclasses.asdict(decoder_config.vae),
                      down_block_types=("DownEncoderBlock2D",) * blocks,
                      up_block_types=("UpDecoderBlock2D",) * blocks).eval()
  qformer = decoder_config.qformer
  qformer_config = Blip2QFormerConfig(
      hidden_size=qformer.hidden_size, num_hidden_layers=qformer.num_layers,
      num_attention_heads=qformer.num_heads, intermediate_size=qformer.mlp_dim,
      encoder_hidden_size=context_width,
      cross_attention_frequency=qformer.cross_attention_frequency,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      layer_norm_eps=qformer.layer_norm_eps)
  return unet, vae, transformers.Blip2QFormerModel(qformer_config).eval()


def image_decoder_loss_reference(decoder_config, unet, vae, qformer, queries, negative,
                                 mmfs_down, mmfs_mid, inputs):
  """Each image's diffusion MSE (SPEC 7), from the modules of `image_decoder_modules`.

  The MMFS residuals enter the UNet as ControlNet residuals (the release adds them at the same
  place: to the down-block skips and to the mid-block output).

  Args:
    queries: `[1, Q, C]` the Q-Former's learned queries; negative: `[1, Q, C]`
      `neg_prompt_embeds`.
    mmfs_down, mmfs_mid: the MMFS net's blocks as torch-named param dicts (one per skip, and
      the mid block), for `mmfs_block_reference`.
    inputs: torch tensors `images [B, H, W, 3]` in [0, 1], `context [B, Lc, E]`, `context_mask
      [B, Lc]`, `mmfs_features [B, N, S, Dv]`, `mmfs_mask [B, N]`, `latent_noise`, `noise`
      (`[B, h, w, c]`), `timesteps [B]`, `uncond_mask [B]` bool.
  Returns:
    `[B]` the mean squared error of each image's noise prediction (unmasked).
  """
  batch = inputs["images"].shape[0]
  nchw = lambda x: x.permute(0, 3, 1, 2)  # noqa: E731
  with torch.no_grad():
    distribution = vae.encode(nchw(inputs["images"]) * 2 - 1).latent_dist
    latents = distribution.mean + distribution.std * nchw(inputs["latent_noise"])
    latents = latents * decoder_config.vae.scaling_factor
    schedule = dataclasses.asdict(decoder_config.noise_schedule)
    scheduler = DDPMScheduler(**{k: schedule[k] for k in (
        "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")})
    timesteps = inputs["timesteps"].long()
    noise = nchw(inputs["noise"])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    conditioning = qformer(query_embeds=queries.expand(batch, -1, -1),
                           encoder_hidden_states=inputs["context"],
                           encoder_attention_mask=inputs["context_mask"]).last_hidden_state
    conditioning = torch.where(inputs["uncond_mask"][:, None, None], negative, conditioning)

    captured = {}
    hooks = [unet.conv_in.register_forward_hook(
        lambda m, i, o: captured.__setitem__("conv_in", o))]
    for index, block in enumerate(unet.down_blocks):
      hooks.append(block.register_forward_hook(
          lambda m, i, o, index=index: captured.__setitem__(index, o[1])))
    hooks.append(unet.mid_block.register_forward_hook(
        lambda m, i, o: captured.__setitem__("mid", o)))
    unet(noisy, timesteps, conditioning)
    for hook in hooks:
      hook.remove()
    skips = [captured["conv_in"]]
    for index in range(len(unet.down_blocks)):
      skips.extend(captured[index])
    assert len(skips) == len(mmfs_down), (len(skips), len(mmfs_down))

    mmfs = decoder_config.mmfs
    settings = dict(eps=mmfs.layer_norm_eps, num_heads=mmfs.num_heads,
                    num_points=mmfs.num_points, scale_sizes=mmfs.scale_sizes,
                    offset_scale_sizes=mmfs.offset_scale_sizes)
    features, mask = inputs["mmfs_features"], inputs["mmfs_mask"]
    residuals = [mmfs_block_reference(params, skip, features, mask,
                                      base_spatial_shape=mmfs.base_spatial_shapes[i], **settings)
                 for i, (params, skip) in enumerate(zip(mmfs_down, skips))]
    mid_residual = mmfs_block_reference(mmfs_mid, captured["mid"], features, mask,
                                        base_spatial_shape=mmfs.mid_base_spatial_shape,
                                        **settings)
    prediction = unet(noisy, timesteps, conditioning, down_block_additional_residuals=residuals,
                      mid_block_additional_residual=mid_residual).sample
    return ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
