"""MM-Interleaved 13B as released: Vicuna-13B v1.3, CLIP ViT-L/14 + ViT-Adapter, SD-2.1-base.

Every hyper-parameter of the released model is here (../shared/SPEC.md, and the original code's
defaults where SPEC is silent; those are marked "code"). Nothing in mmi_jax hard-codes them.

Usage: `python -m mmi_jax.<job> --config=configs/mmi_13b.py --config.mesh.fsdp=8 ...`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "mmi_13b"
  config.seed = 0

  # Device mesh: sizes of (data, fsdp, tensor); -1 takes the remaining devices.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)

  model = config.model = ml_collections.ConfigDict()
  model.dtype = "bfloat16"  # computation
  model.param_dtype = "float32"  # storage of params and optimizer state

  # SPEC 2: vocabulary and sequence layout.
  model.tokens = dict(
      text_vocab_size=32000,  # Llama's vocabulary
      vocab_size=32002,  # + <|beginofimage|> (soi) + <|image|>
      bos_id=1,
      eos_id=2,
      pad_id=31999,  # an existing token reused as pad
      soi_id=32000,
      image_id=32001,
      tokens_per_image=64,  # soi + 64 <|image|> = 65 tokens per image
      max_sequence_length=2048,
  )

  # SPEC 3: CLIP ViT-L/14 (frozen).
  model.vision_encoder = dict(
      image_size=224,
      patch_size=14,
      num_channels=3,
      hidden_size=1024,
      num_layers=24,
      num_heads=16,
      mlp_dim=4096,
      activation="quick_gelu",
      layer_norm_eps=1e-5,
      pixel_mean=(0.48145466, 0.4578275, 0.40821073),
      pixel_std=(0.26862954, 0.26130258, 0.27577711),
      frozen=True,  # the release trains only the adapter on top of the ViT (freeze_vit)
  )

  # SPEC 3: ViT-Adapter (trainable).
  model.vision_adapter = dict(
      prior_image_size=256,  # the image is bilinearly resized to this for the conv stem
      conv_inplane=64,  # stem width; stages 64 -> 128 -> 256 -> 256
      num_heads=16,  # code: the ViT's head count
      num_points=4,
      value_ratio=0.5,
      ffn_ratio=0.25,  # ConvFFN hidden = 256
      gamma_init=0.0,  # injector output scale
      interaction_indexes=((0, 5), (6, 11), (12, 17), (18, 23)),
      extra_extractors=2,  # on the last interaction block
      layer_norm_eps=1e-5,  # code: injector/extractor LayerNorms (plain nn.LayerNorm)
      prior_layer_norm_eps=1e-6,  # channels-first LayerNorm of the conv stem, in float32
  )

  # SPEC 4: visual tokenizer (64 tokens per image).
  model.visual_tokenizer = dict(
      pos_grid_size=16,  # 2-D sin-cos table, 1024-d, zero row for cls
      layer_norm_eps=1e-6,  # pos_ln and post_ln
      proj_init_std=1e-3,  # Linear(768 -> LLM width)
      qformer=dict(  # BLIP-2 Q-Former used as a perceiver resampler
          num_queries=64,
          hidden_size=768,
          num_layers=12,
          num_heads=12,
          mlp_dim=3072,  # code: Blip2QFormerConfig default
          cross_attention_frequency=2,
          qk_normalization=True,
          layer_norm_eps=1e-12,  # code: Blip2QFormerConfig default
          dropout=0.1,  # code: defaults, active in training
          attention_dropout=0.1,
          init_std=0.02,
      ),
  )

  # SPEC 5: the LLM (frozen except the MMFS layers).
  model.llm = dict(
      hidden_size=5120,
      num_layers=40,
      num_heads=40,
      num_kv_heads=40,
      mlp_dim=13824,
      activation="silu",
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      max_position_embeddings=2048,
      # SPEC 5/6: the synchronizer in layers with index % layer_frequency == 0. Its values are
      # the adapter's maps of these sizes (width = vision_encoder.hidden_size).
      mmfs=dict(
          layer_frequency=4,
          num_heads=16,
          num_points=8,
          scale_sizes=(32, 16, 8),
          base_spatial_shape=16,
          offset_init_magnitude=3.0,
          max_images=50,
          reference_point=(0.5, 0.5),  # code: every token samples around the image centre
          gate_init=0.0,
          # code: the kernels MMFS never re-initialises start as HF Llama's Linear, N(0, 0.02).
          kernel_init_std=0.02,
      ),
  )

  # SPEC 5: text head = frozen `head` + trainable `head_new` for the two new ids.
  model.text_head = dict(new_token_bias=-100.0, head_new_bias=95.0)

  # SPEC 7: image decoder.
  model.image_decoder = dict(
      image_size=512,
      uncond_prob=0.1,  # conditioning replaced by neg_prompt_embeds during training
      context_pos_length=2048,  # rows of the 1-D sin-cos table added to image contexts
      # Static length of each image's context (from its soi back to its document's <s>);
      # the release's longest context is the whole sequence.
      max_context_length=2048,
      qformer=dict(
          num_queries=77,
          hidden_size=1024,
          num_layers=1,
          num_heads=16,
          mlp_dim=3072,  # code: Blip2QFormerConfig default
          cross_attention_frequency=1,
          qk_normalization=False,
          layer_norm_eps=1e-12,
          dropout=0.0,
          attention_dropout=0.0,
          init_std=0.02,
      ),
      unet=dict(  # UNet2DConditionModel of SD-2.1-base
          in_channels=4,
          out_channels=4,
          sample_size=64,
          block_out_channels=(320, 640, 1280, 1280),
          layers_per_block=2,
          down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
          attention_head_dim=(5, 10, 20, 20),  # used by diffusers as the number of heads
          cross_attention_dim=1024,
          use_linear_projection=True,
          norm_num_groups=32,
          norm_eps=1e-5,
          flip_sin_to_cos=True,
          freq_shift=0,
          downsample_padding=1,
      ),
      vae=dict(  # AutoencoderKL of SD-2.1-base (frozen)
          in_channels=3,
          out_channels=3,
          latent_channels=4,
          block_out_channels=(128, 256, 512, 512),
          layers_per_block=2,
          norm_num_groups=32,
          scaling_factor=0.18215,
      ),
      noise_schedule=dict(
          num_train_timesteps=1000,
          beta_schedule="scaled_linear",
          beta_start=0.00085,
          beta_end=0.012,
          prediction_type="epsilon",
          # SD-2.1-base's scheduler_config.json: sampling timesteps start one step later, and
          # DDIM's last step goes to alphas_cumprod[0].
          steps_offset=1,
          set_alpha_to_one=False,
      ),
      # SPEC 7: MMFSNet, a block on each UNet down residual (conv_in, every resnet and
      # downsample output) and one on the mid block, sampling the previous image's maps.
      mmfs=dict(
          attention_dim=1024,
          num_heads=16,
          num_points=8,
          scale_sizes=(64, 32, 16, 8),
          # code: MMFSNet builds every block's MMFS with these, whatever the image size, so
          # offsets scale by offset_scale_sizes / base_spatial_shape.
          offset_scale_sizes=(64, 32, 16, 8),
          base_spatial_shapes=(64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8),
          mid_base_spatial_shape=8,
          offset_init_magnitude=1.0,
          max_images=10,
          pos_grid_size=64,
          layer_norm_eps=1e-6,
          kernel_init_std=None,  # code: PyTorch's Linear default for the unset kernels
      ),
  )

  # SPEC 1: total loss = text_weight * loss_txt + image_weight * loss_img.
  model.loss = dict(text_weight=1.0, image_weight=10.0)

  # SPEC 9: pre-training recipe (the release's HF Trainer arguments, mm_pretrain.yaml).
  config.train = dict(
      steps=15000,
      warmup_steps=1000,
      schedule="cosine",  # HF get_cosine_schedule_with_warmup: linear warm-up, cosine to 0
      learning_rate=1e-4,
      adam_b1=0.9,
      adam_b2=0.995,
      adam_eps=1e-6,
      weight_decay=0.05,
      max_grad_norm=1.0,  # code: HF Trainer's default clipping of the global gradient norm
      gradient_accumulation_steps=1,
      # (parameter-name pattern, learning rate, weight decay or None for the default); first
      # match wins, as in the release. Patterns are substrings of the release's state-dict
      # names. Biases and LayerNorm params get no weight decay in any group (HF Trainer).
      param_groups=(
          ("llama_cross_attn.gate", 1e-4, 0.0),
          ("sampling_offsets", 1e-5, 0.0),
          ("llama_cross_attn", 1e-4, None),
          ("image_decoder.decoder.unet", 1e-5, None),
      ),
      # Regexes over '/'-joined param paths: `unfreeze` trains params the release freezes
      # (SPEC 9), `freeze` freezes more. Empty: exactly the release's trainable set.
      unfreeze=(),
      freeze=(),
      remat_policy="",  # "": none; else a jax.checkpoint_policies name ("nothing_saveable")
      attention_implementation="",  # "": JAX's choice for the platform; "xla", "cudnn"
      init_checkpoint="",  # a release checkpoint (`convert.release.load`) to start from
      # What the job adds to the training loop: `mmi_jax.train.extensions.Extension`
      # subclasses by dotted name ("package.module.Class"); each may own a config section.
      extensions=(),
      log_every=10,  # steps between log lines and TensorBoard scalars
      eval_every=1000,  # steps between the extensions' evaluations (0: only after the last)
      checkpoint_every=1000,  # steps between asynchronous Orbax saves
      keep_checkpoints=5,  # the last K are kept
  )

  # SPEC 2: data layout. The default data is the built-in generator of interleaved documents
  # of simple pictures (`mmi_jax.data.shapes`), rendered at the model's image sizes.
  config.data = dict(
      dataset="shapes",
      max_images_per_sequence=30,  # image-text pairs; 15 for interleaved web documents
      batch_size=2,  # global rows (sequences) per optimizer step and micro-batch
      sequence_length=2048,  # tokens per row
      documents_per_row=1,  # documents packed into each row
      seed=0,  # shuffling and generation of the training documents
      train_documents=1_000_000,  # size of the training split (documents)
      held_out_documents=512,  # size of the held-out split
      # The shapes pictures' layout: the shape's size range (fraction of the picture side) and
      # whether it sits at the centre (else anywhere inside a margin).
      scene_sizes=(0.45, 0.7),
      scene_centred=False,
      # Of the shapes documents, the fraction with images before their sentences (the rest
      # have them after: text-to-image).
      image_first_fraction=0.5,
  )

  # Multi-host: `jax.distributed.initialize` before anything else when `initialize` (empty
  # fields: auto-detected on TPU pods, SLURM and the like).
  config.distributed = dict(initialize=False, coordinator_address="", num_processes=0,
                            process_id=-1)

  # SPEC 10: interleaved inference.
  config.generate = dict(
      top_p=0.9,
      repetition_penalty=1.3,
      max_new_tokens=90,
      num_inference_steps=30,
      guidance_scale=7.5,
      sampler="ddpm",  # code: the training DDPMScheduler is what the release samples with
  )
  return config
