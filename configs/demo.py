"""The main job's built-in default: MM-Interleaved learning the built-in shapes documents on a CPU.

`python -m mmi_jax.train --config=configs/demo.py --workdir=/tmp/demo` trains the released
architecture (every component, the MMFS layers in the LLM and the UNet included) at a size a
2-core CPU trains in about 15 minutes, on `mmi_jax.data.shapes`: pictures of a coloured shape
on a plain background with captions, alone or in documents of 2-3 images where a later image
depends on an earlier one ("the same shape, now in green"). Its extensions (`train.extensions`)
fit stand-ins for the pretrained weights (`mmi_jax.demo.stand_ins`, settings `stand_ins`) and
evaluate captions and pictures on held-out documents (`mmi_jax.demo.shapes_evaluation`,
settings `shapes_eval`). experiments/PERFORMANCE.md records the runs behind these numbers.

What differs from the release's recipe, and why:
  * Nothing pretrained can be downloaded, so the extension fits stand-ins first: the vision
    encoder (ViT and adapter) classifies the training pictures' shape, colour and background
    (`stand_ins.vision_fit`), after which the ViT trunk stays frozen, as the release keeps
    CLIP's; the (otherwise frozen) VAE is fitted as an autoencoder (`stand_ins.vae_fit`); the
    image decoder's Q-Former and UNet learn to draw the training pictures from their
    captions' contexts, with learned vectors standing in for the LLM's states
    (`stand_ins.decoder_fit`). After the last train step they are fitted again through the
    trained, frozen LLM's states and `context_feat_proj` (`stand_ins.decoder_fit_after_training`),
    as SD's UNet was trained on a frozen text encoder's states: jointly trained only, a
    decoder from scratch does not learn to read the LLM's states in a few hundred steps.
  * The LLM and its text head train from scratch (`train.unfreeze`), for the same reason.
  * The VAE is 16 channels wide at every level, in GroupNorm groups of 4 (narrower groups take
    each channel's mean out of every picture, and the decoder loses the shapes' colours), with
    3 levels for pictures of 32 x 32 (latents 8 x 8); its latents' deviation is about 1.7, so
    the scaling factor is 0.6 (SD's 0.18215 scales SD's latents to about 1).
  * The UNet predicts v (`prediction_type` "v_prediction", as SD 2.1's 768 model; the
    release's base model predicts the noise): the noise's loss weighs the picture's error at
    high noise, where its colour is decided, by the signal-to-noise ratio, so a UNet from
    scratch learns colours much slower predicting the noise.
  * The image loss's weight is 1 (the release: 10): the release's LLM is frozen, this one
    trains, and with 10 the image loss's gradient takes over its updates.
  * The UNet and the image Q-Former learn at a tenth of the base rate (the release's UNet:
    1e-5 of 1e-4) and `context_feat_proj` at ten times it; the sampling offsets learn at the
    base rate (the release's lower rate assumes pretrained weights and 15000 steps).
  * The Q-Formers' init std is the release's 0.02 scaled to the tiny width (0.02 x
    sqrt(768 / 32) ~ 0.1), and the visual tokens' projection starts at the word embeddings'
    scale (0.02; the release: 1e-3 into a 5120-wide LLM): with the release's values at this
    width the visual tokens hardly depend on the picture at first.
  * The shapes have one size and sit at the centre (`data.scene_sizes`,
    `data.scene_centred`), so that a model this small learns them in minutes.
  * More drawing from text: 60% of the documents put their sentences before their pictures
    (`data.image_first_fraction` 0.4; an image after only `<s>` has no diffusion loss), and a
    row takes two documents (`data.documents_per_row`) when their pictures fit its 3 slots,
    else the second is skipped and counted.
  * A higher learning rate and a short schedule: 400 steps.
"""

import ml_collections

from configs import tiny

EXTENSIONS = ("mmi_jax.demo.stand_ins.StandIns", "mmi_jax.demo.shapes_evaluation.ShapesEvaluation")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """`variant` "text_only" (`--config=configs/demo.py:text_only`): the model without its image
  decoder, as the release without `image_decoder_config` (text loss only)."""
  if variant not in ("", "text_only"):
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: text_only)")
  config = tiny.get_config()
  config.name = "demo" if not variant else f"demo_{variant}"
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  model = config.model
  model.dtype = "float32"  # bfloat16 is slow on CPUs

  # The shapes tokenizer's words (mmi_jax.data.tokenizer) fit in 64 ids; + soi + <|image|>.
  model.tokens.update(text_vocab_size=64, vocab_size=66, pad_id=0, soi_id=64, image_id=65,
                      tokens_per_image=8, max_sequence_length=64)

  # 4 ViT layers, one per interaction block (the release: 24 in blocks of 6).
  model.vision_encoder.update(num_layers=4)
  model.vision_adapter.interaction_indexes = ((0, 0), (1, 1), (2, 2), (3, 3))
  model.llm.update(num_layers=4, max_position_embeddings=64)  # MMFS in layer 0
  model.image_decoder.update(context_pos_length=64, max_context_length=64)
  # One resnet per UNet level (the release: 2), so the MMFS net has 1 + 2 + 2 + 2 + 1 blocks
  # on the skips (the release: 12) and one on the mid block.
  model.image_decoder.unet.layers_per_block = 1
  model.image_decoder.mmfs.base_spatial_shapes = (8, 8, 8, 4, 4, 2, 2, 1)
  model.image_decoder.vae.layers_per_block = 1
  # Pictures of 32 x 32 through a VAE of 3 levels (latents 8 x 8, as tiny's 64 / 8), 16 wide in
  # GroupNorm groups of 4.
  model.image_decoder.image_size = 32
  model.image_decoder.vae.update(block_out_channels=(16, 16, 16), norm_num_groups=4,
                                 scaling_factor=0.6)
  model.image_decoder.noise_schedule.prediction_type = "v_prediction"
  model.visual_tokenizer.qformer.init_std = 0.1
  model.visual_tokenizer.proj_init_std = 0.02
  model.image_decoder.qformer.init_std = 0.1
  model.loss.image_weight = 1.0

  # Two documents per row when their pictures fit the row's 3 slots (a document: at most 3
  # pictures and 59 tokens).
  config.data.update(batch_size=4, sequence_length=64, documents_per_row=2,
                     max_images_per_sequence=3, train_documents=100_000,
                     held_out_documents=64, scene_sizes=(0.6, 0.6), scene_centred=True,
                     image_first_fraction=0.4)

  train = config.train
  train.update(steps=400, warmup_steps=40, learning_rate=1e-3, weight_decay=0.05,
               log_every=25, eval_every=200, checkpoint_every=200, keep_checkpoints=2,
               extensions=EXTENSIONS)
  train.param_groups = (("context_feat_proj", 1e-2, None),
                        ("image_decoder.decoder.unet", 1e-4, None),
                        ("image_decoder.perceiver_resampler", 1e-4, None))
  train.unfreeze = (r"^mm_decoder/", r"^text_decoder/head/")

  # `mmi_jax.demo.stand_ins.StandIns.settings()` describes each key. The fits' cosine
  # schedules decay to 2% of their rate.
  config.stand_ins = dict(
      vision_fit=dict(steps=300, batch_size=16, learning_rate=1e-3),
      vae_fit=dict(steps=1000, batch_size=16, learning_rate=4e-3, kl_weight=1e-4,
                   schedule="cosine", warmup_steps=50),
      llm_fit=dict(steps=0, batch_size=16, learning_rate=1e-3),
      decoder_fit=dict(steps=600, batch_size=32, learning_rate=1e-3, context="stand_in",
                       schedule="cosine", warmup_steps=20),
      decoder_fit_after_training=dict(steps=900, batch_size=32, learning_rate=1e-3,
                                      schedule="cosine", warmup_steps=20),
  )
  # `mmi_jax.demo.shapes_evaluation.ShapesEvaluation.settings()` describes each key.
  config.shapes_eval = dict(caption_documents=64, max_caption_tokens=16,
                            generation_documents=64, generation_steps=30, guidance_scale=7.5)

  if variant == "text_only":
    model.image_decoder = None
    config.stand_ins.vae_fit.steps = 0
    config.stand_ins.decoder_fit.steps = 0
    config.stand_ins.decoder_fit_after_training.steps = 0
    train.param_groups = ()  # its patterns name the image decoder's params
    config.shapes_eval.generation_documents = 0
  return config
