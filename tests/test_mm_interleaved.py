"""MMInterleaved: one compilation per batch shape for the loss and its gradient, the same loss
and gradient on 8 simulated devices, the batch checks, and the wiring helpers on hand-made
layouts. (The comparison with an independent PyTorch reference is in
test_mm_interleaved_reference.py.)"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import demo
from mmi_jax import sharding
from mmi_jax.batch import validate
from mmi_jax.convert import release
from mmi_jax.models import mm_interleaved as mmi
from mmi_jax.models.batch import Batch
from random_params import random_params
from training_cases import small_model

# The demo's model: every component of the release (MMFS in the LLM, the MMFS net in the UNet),
# with fewer layers (`training_cases.small_model`: an LLM of 2 layers, MMFS in the first; a UNet
# of 2 levels), so that the 8-device gradient compiles in a minute on a CI CPU. The release's
# layer pattern (tiny widths) is compared with PyTorch in test_mm_interleaved_reference.py.
CONFIG = small_model(demo.get_config().model)
# The release's loss weights and objective (the demo weighs the image loss 1 and predicts v).
CONFIG.loss.image_weight = 10.0
CONFIG.image_decoder.noise_schedule.prediction_type = "epsilon"
TOKENS = CONFIG.tokens
BOS, EOS, PAD, SOI, IMG = (TOKENS.bos_id, TOKENS.eos_id, TOKENS.pad_id, TOKENS.soi_id,
                           TOKENS.image_id)
IMAGE = [SOI] + [IMG] * TOKENS.tokens_per_image


def make_batch(seed: int) -> Batch:
  """2 rows, 6 image slots: row 0 packs two documents (two images, then one whose context is
  only [<s>, soi]); row 1 has one image; 2 padding slots. Words vary with the seed."""
  rng = np.random.default_rng(seed)
  words = lambda n: list(rng.integers(3, TOKENS.text_vocab_size, n))  # noqa: E731
  row0 = [BOS] + words(3) + IMAGE + words(2) + IMAGE + words(2) + [EOS] + [BOS] + IMAGE + words(
      2) + [EOS]
  row1 = [BOS] + words(4) + IMAGE + words(3) + [EOS]
  length = len(row0) + 2
  text_ids = np.full((2, length), PAD, np.int32)
  attention_mask = np.zeros((2, length), np.int32)
  for row, ids in enumerate((row0, row1)):
    text_ids[row, :len(ids)], attention_mask[row, :len(ids)] = ids, 1
  encoder, decoder = CONFIG.vision_encoder.image_size, CONFIG.image_decoder.image_size
  return Batch(
      text_ids=text_ids, attention_mask=attention_mask,
      images=rng.random((6, encoder, encoder, 3), np.float32),
      decoder_images=rng.random((6, decoder, decoder, 3), np.float32),
      image_sequence_ids=np.array([0, 1, 0, 0, 0, 0], np.int32),
      image_valid=np.array([1, 1, 1, 1, 0, 0], bool))


@functools.lru_cache(maxsize=None)
def model_and_params():
  model = mmi.MMInterleaved.from_config(CONFIG)
  abstract = release.param_shapes(CONFIG)
  return model, abstract, jax.tree.map(jnp.asarray, random_params(abstract, seed=3))


TRACES = []


def loss_fn(params, batch, rng):
  TRACES.append(1)  # runs once per trace
  model, _, _ = model_and_params()
  out = model.apply({"params": params}, batch, rng=rng)
  return out["loss"], {key: out[key] for key in ("loss_txt", "loss_img", "per_image_loss")}


@pytest.fixture(scope="module")
def single_device_results():
  _, _, params = model_and_params()
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  results = [step(params, make_batch(seed), jax.random.key(seed)) for seed in (0, 1)]
  return results, len(TRACES)


def test_loss_and_gradient_compile_once_per_batch_shape(single_device_results):
  results, traces = single_device_results
  assert traces == 1
  (loss_a, aux_a), grads_a = results[0]
  (loss_b, _), _ = results[1]
  assert np.isfinite(float(loss_a)) and float(loss_a) != float(loss_b)
  np.testing.assert_allclose(float(loss_a), float(aux_a["loss_txt"])
                             + CONFIG.loss.image_weight * float(aux_a["loss_img"]), rtol=1e-6)
  # Padding slots have no loss; the [<s>, soi] image has a loss value but no weight.
  flat = {"/".join(k.key for k in path): np.asarray(g)
          for path, g in jax.tree_util.tree_flatten_with_path(grads_a)[0]}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  # Every part of the model receives gradient, the MMFS layers and the MMFS net included.
  for name in ("visual_tokenizer/encoder/adapter_interactions_0/injector/gamma",
               "mm_decoder/layers_0/llama_cross_attn/gate", "soi_token",
               "context_feat_proj/kernel", "image_decoder/perceiver_resampler/queries",
               "image_decoder/decoder/mmfs_module/mmfs_down_blocks_0/conv/kernel",
               "image_decoder/decoder/unet/conv_in/kernel", "text_decoder/head_new/kernel"):
    assert np.abs(flat[name]).max() > 0, name


def test_loss_and_gradient_on_8_devices_equal_one_device(single_device_results):
  (single_loss, single_aux), single_grads = single_device_results[0][0]
  _, abstract, params = model_and_params()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  param_shardings = sharding.param_shardings(abstract, mesh)
  rows = NamedSharding(mesh, PartitionSpec("data"))
  batch_shardings = jax.tree.map(lambda _: rows, make_batch(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  with sharding.use_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(param_shardings, batch_shardings, replicated),
                   out_shardings=((replicated, replicated), param_shardings))
    (loss, aux), grads = step(jax.device_put(params, param_shardings),
                              jax.device_put(make_batch(0), batch_shardings),
                              jax.random.key(0))
  assert grads["mm_decoder"]["embed_tokens"]["embedding"].sharding.spec != PartitionSpec()
  np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
  for key in ("loss_txt", "loss_img"):
    np.testing.assert_allclose(float(aux[key]), float(single_aux[key]), rtol=1e-5)
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(single_grads))
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree.leaves(single_grads)):
    got, want = np.asarray(got), np.asarray(want)
    # Sums are reduced in another order across devices; gradients through sampling
    # locations amplify that, so leaves agree to 2e-3 of their largest entry, and leaves whose
    # exact gradient is 0 (attention key biases) to 1e-5 of the largest gradient anywhere.
    # (The adapter's sampling offsets differed by 1.7e-3 of their largest entry on one CI
    # machine, and by less than 1e-3 on another.)
    tolerance = 2e-3 * np.abs(want).max() + 1e-5 * largest
    assert np.abs(got - want).max() <= tolerance, jax.tree_util.keystr(path)


# --------------------------------------------------------------------------------------------
# The wiring helpers on a hand-made layout.


def test_contexts_and_previous_images_of_a_packed_row():
  batch = make_batch(0)
  ids, mask = jnp.asarray(batch.text_ids), jnp.asarray(batch.attention_mask)
  sequence_ids, valid = jnp.asarray(batch.image_sequence_ids), jnp.asarray(batch.image_valid)
  soi, ranks = mmi.image_soi_positions(ids, mask, sequence_ids, valid, SOI)
  expected_soi = [int(p) for p in np.flatnonzero(batch.text_ids[0] == SOI)]
  row1_soi = int(np.flatnonzero(batch.text_ids[1] == SOI)[0])
  np.testing.assert_array_equal(soi, [expected_soi[0], row1_soi, expected_soi[1],
                                      expected_soi[2], -1, -1])
  np.testing.assert_array_equal(ranks[:4], [0, 0, 1, 2])
  second_document = int(np.flatnonzero(batch.text_ids[0] == BOS)[1])
  starts = jnp.asarray([0, 0, 0, second_document, 0, 0])
  previous, visible = mmi.previous_image(sequence_ids, ranks, valid, soi, starts)
  # Slot 2 (second image of document 1) sees slot 0; slot 3 (first image of document 2) has
  # its previous image in another document, so none; the rest have no previous image.
  assert int(previous[2]) == 0
  np.testing.assert_array_equal(visible, [0, 0, 1, 0, 0, 0])
  hidden = jnp.arange(2 * ids.shape[1], dtype=jnp.float32).reshape(2, -1, 1)
  context, context_mask = mmi.image_contexts(hidden, sequence_ids, soi, starts, 40)
  np.testing.assert_array_equal(context_mask.sum(1), [expected_soi[0] + 1, row1_soi + 1,
                                                      expected_soi[1] + 1, 2, 0, 0])
  # Reversed: the soi's own hidden state first, then backwards to the context start.
  np.testing.assert_array_equal(context[3, :2, 0], [expected_soi[2], second_document])
  assert float(jnp.abs(context[4]).sum()) == 0


def test_text_targets_drop_the_release_s_ignored_tokens():
  ids = np.array([[BOS, SOI, IMG, IMG, 5, 6, EOS, BOS, 7, SOI, IMG, IMG, 8, PAD]], np.int32)
  mask = (ids != PAD).astype(np.int32)
  tokens = mmi.AssemblyConfig.from_config(CONFIG).tokens
  targets = mmi.text_targets(jnp.asarray(ids), jnp.asarray(mask), tokens)
  ignored = mmi.IGNORE_INDEX
  # soi after <s>: ignored; <|image|>: ignored; <s>: ignored; soi after text: kept.
  np.testing.assert_array_equal(targets[0], [ignored, ignored, ignored, 5, 6, EOS, ignored, 7,
                                             SOI, ignored, ignored, 8, ignored])
  offsets = mmi.text_targets(jnp.asarray(ids), jnp.asarray(mask), tokens,
                             prompt_offsets=jnp.asarray([6]),
                             ignore_noimage_text=jnp.asarray([True]))
  np.testing.assert_array_equal(offsets[0], [ignored] * 5 + [EOS, ignored, ignored, SOI,
                                                            ignored, ignored, 8, ignored])


# --------------------------------------------------------------------------------------------
# Batch checks.


@pytest.mark.parametrize("change, message", [
    (lambda b: b.replace(image_sequence_ids=np.array([0, 0, 0, 0, 0, 0], np.int32)),
     "row 0: 4 soi tokens but 3 images|row 0: 3 soi tokens but 4 images"),
    (lambda b: b.replace(images=b.images[:, :8]), r"batch.images must be \[N, 56, 56, 3\]"),
    (lambda b: b.replace(decoder_images=None), "must be .* for the image decoder"),
    (lambda b: b.replace(image_valid=b.image_valid[:5]), r"image_valid must be \[6\]"),
    (lambda b: b.replace(image_sequence_ids=np.array([0, 2, 0, 0, 0, 0], np.int32)),
     "image slot 1 names row 2"),
    (lambda b: b.replace(context_starts=np.array([0, 0, 0, 30, 0, 0], np.int32)),
     "image slot 3 starts its context at 30"),
    (lambda b: b.replace(text_ids=np.where(b.text_ids == IMG, 5, b.text_ids)),
     "0 <|image|> tokens for 3 images"),
])
def test_validate_names_the_problem(change, message):
  validate(make_batch(0), CONFIG)
  with pytest.raises(ValueError, match=message):
    validate(change(make_batch(0)), CONFIG)


def test_without_an_image_decoder_the_loss_is_the_text_loss():
  config = demo.get_config().model
  config.image_decoder = None
  model = mmi.MMInterleaved.from_config(config)
  batch = make_batch(0).replace(decoder_images=None)
  validate(batch, config)
  abstract = sharding.abstract_params(model, batch)
  assert set(abstract) == {"visual_tokenizer", "mm_decoder", "text_decoder", "soi_token"}
  out = jax.eval_shape(lambda p: model.apply({"params": p}, batch), nn.meta.unbox(abstract))
  assert out["loss"].shape == () and "per_image_loss" not in out
