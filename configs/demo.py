"""The main job's built-in default: MM-Interleaved learning the built-in shapes documents on a CPU.

`python -m mmi_jax.train --config=configs/demo.py --workdir=/tmp/demo` trains the released
architecture (every component, the MMFS layers in the LLM and the UNet included) at a size a
2-core CPU trains in minutes, on `mmi_jax.data.shapes`: pictures of a coloured shape on a plain
background with captions, alone or in documents of 2-3 images where a later image depends on
an earlier one ("the same shape, now in green").

What differs from the release's recipe, and why:
  * CLIP's pretrained ViT is replaced by fitting the encoder (ViT and adapter) to classify the
    training pictures' shape, colour and background before training starts
    (`train.vision_fit`); the ViT trunk then stays frozen, as the release keeps CLIP's.
  * SD's pretrained VAE is replaced by fitting the (otherwise frozen) VAE as an autoencoder on
    the training pictures before training starts (`train.vae_fit`, 1000 steps, cosine decay:
    at a constant rate for 800 steps it ended at a reconstruction error of 0.007-0.034 by its
    seed, and its reconstructions kept the colour of 0.69-1.00 of the pictures; with the
    cosine decay they keep every colour); the diffusion loss then trains on its latents
    exactly as the release trains on SD's. The VAE is 16 channels wide at every level, in
    GroupNorm groups of 4: with tiny's 8 channels in groups of 8 the norms take each
    channel's mean out of every picture and the decoder loses the shapes' colours. It has 3
    levels for pictures of 32 x 32 (latents 8 x 8, as tiny's 64 x 64 in 4 levels), so its
    fit takes a third of the time. A KL weight of 1e-4 (1e-3 shifted orange towards red);
    its latents' deviation is about 1.7, so the scaling factor is 0.6 (SD's 0.18215 makes
    its latents about 1).
  * SD's pretrained UNet is replaced by fitting the image decoder's Q-Former and UNet to draw
    the training pictures from their captions' contexts before training starts
    (`train.decoder_fit`, 600 steps of 32 pictures, cosine decay), with learned vectors
    standing in for the LLM's states, and again after the last train step, with
    `context_feat_proj`, through the trained, frozen LLM's states
    (`train.decoder_fit_after_training`, 900 steps of 32, cosine decay), as SD's UNet was
    trained on a frozen text encoder's states. Jointly trained only, the fitted decoder does
    not learn to read the LLM in 500 steps: the colour is in its states (a linear read-out
    of the context or of the Q-Former's output names it for every held-out caption), yet
    only 0.20-0.41 of the pictures had it, at whatever rate the decoder trained; the fit
    after training alone, from the jointly trained decoder without the first fit, gave 0.34
    (experiments/PERFORMANCE.md). The evaluation at step 200 shows the decoder before its
    second fit; after it, 0.86 of 64 held-out captions are drawn in their colour
    (guidance 7.5). The second fit's length matters most: from the same checkpoint, 600
    steps gave 0.67 and 900 steps 0.97. In training, the UNet and the image Q-Former learn
    at a tenth of the base rate (the release's UNet: 1e-5 of 1e-4) and `context_feat_proj`
    at ten times it.
  * The UNet predicts v (`prediction_type` "v_prediction", as SD 2.1's 768 model does; the
    release's base model predicts the noise): the noise's loss weighs the picture's error at
    high noise, where its colour is decided, by the signal-to-noise ratio, so a UNet from
    scratch learns colours several times slower (with an oracle conditioning, 500 steps:
    0.25 of the colours right predicting the noise, 0.95 predicting v).
  * The image loss's weight is 1 (the release: 10): the release's LLM is frozen, ours trains
    from scratch, and with 10 the image loss's gradient took over its updates (captions 0.53
    at step 500 instead of 1.0).
  * Nothing pretrained can be downloaded for the LLM either, so the LLM and its text head
    train from scratch (`train.unfreeze`).
  * The Q-Formers' init std is the release's 0.02 scaled to the tiny width (0.02 x
    sqrt(768 / 32) ~ 0.1), and the visual tokens' projection starts at the word embeddings'
    scale (0.02, the release: 1e-3 into a 5120-wide LLM): with the release's values at
    this width the visual tokens hardly depend on the picture at first.
  * The pictures' shape has one size and sits at the centre (`data.scene_sizes`,
    `data.scene_centred`), so that a model this small learns them in minutes.
  * More drawing from text: 60% of the documents put their sentences before their pictures
    (`data.image_first_fraction` 0.4; an image after only `<s>` has no diffusion loss), and a
    row takes two documents (`data.documents_per_row`) when their pictures fit its 3 slots,
    else the second is skipped and counted (about 1 in 5): 6.6 documents and 9 pictures a
    step instead of 4 and 6.
  * A higher learning rate and a short schedule (400 steps, about 15 minutes for the whole job
    on 2 CPU cores with the fits); the release's lower rate for the sampling
    offsets assumes pretrained weights and 15000 steps, so they learn at the base rate.
"""

import importlib.util
import pathlib

import ml_collections


def _tiny_config() -> ml_collections.ConfigDict:
  path = pathlib.Path(__file__).with_name("tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """`variant` "text_only" (`--config=configs/demo.py:text_only`): the model without its image
  decoder, as the release without `image_decoder_config` (text loss only)."""
  if variant not in ("", "text_only"):
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: text_only)")
  config = _tiny_config()
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
  # GroupNorm groups of 4 (tiny: groups of 1 at the first and last level lose the colours).
  model.image_decoder.image_size = 32
  model.image_decoder.vae.update(block_out_channels=(16, 16, 16), norm_num_groups=4)
  model.visual_tokenizer.qformer.init_std = 0.1
  model.visual_tokenizer.proj_init_std = 0.02
  model.image_decoder.qformer.init_std = 0.1

  # Two documents per row when their pictures fit the row's 3 slots (a document: at most 3
  # pictures and 59 tokens).
  config.data.update(batch_size=4, sequence_length=64, documents_per_row=2,
                     max_images_per_sequence=3, train_documents=100_000,
                     held_out_documents=64, scene_sizes=(0.6, 0.6), scene_centred=True,
                     image_first_fraction=0.4)

  train = config.train
  train.update(steps=400, warmup_steps=40, learning_rate=1e-3, weight_decay=0.05,
               log_every=25, eval_every=200, checkpoint_every=200, keep_checkpoints=2)
  train.vision_fit.update(steps=300, batch_size=16, learning_rate=1e-3)
  train.vae_fit.update(steps=1000, batch_size=16, learning_rate=4e-3, kl_weight=1e-4,
                       schedule="cosine", warmup_steps=50)
  # The fitted latents' standard deviation is about 1.7; SD scales its latents to about 1.
  model.image_decoder.vae.scaling_factor = 0.6
  model.image_decoder.noise_schedule.prediction_type = "v_prediction"
  model.loss.image_weight = 1.0
  train.decoder_fit.update(steps=600, batch_size=32, learning_rate=1e-3, context="stand_in",
                           schedule="cosine", warmup_steps=20)
  train.decoder_fit_after_training.update(steps=900, batch_size=32, learning_rate=1e-3,
                                          schedule="cosine", warmup_steps=20)
  train.param_groups = (("context_feat_proj", 1e-2, None),
                        ("image_decoder.decoder.unet", 1e-4, None),
                        ("image_decoder.perceiver_resampler", 1e-4, None))
  config.eval.update(caption_documents=64, generation_documents=64, generation_steps=30)
  train.unfreeze = (r"^mm_decoder/", r"^text_decoder/head/")
  if variant == "text_only":
    model.image_decoder = None
    train.vae_fit.steps = 0
    train.decoder_fit.steps = 0
    train.decoder_fit_after_training.steps = 0
    train.param_groups = ()  # its patterns name the image decoder's params
    config.eval.generation_documents = 0
  return config
