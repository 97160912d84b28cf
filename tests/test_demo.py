"""The demo's extensions: the stand-in fits (`mmi_jax.demo.stand_ins`, on one fit loop) and
the held-out evaluation on the shapes documents (`mmi_jax.demo.shapes_evaluation`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from configs import demo
from mmi_jax.data import pipeline, shapes, tokenizer
from mmi_jax.data.tokenizer import shapes_tokenizer
from mmi_jax.demo import decoder_fit, fit_loop, llm_fit, vae_fit, vision_fit
from mmi_jax.demo.shapes_evaluation import (GRID_HEADER, GRID_PAD, GRID_TEXT_WIDTH, Evaluator,
                                            caption_words, grid_tile)
from mmi_jax.demo.stand_ins import StandIns
from mmi_jax.models.image_decoder import ImageDecoder
from mmi_jax.models.multimodal_inputs import TokenIds
from mmi_jax.models.vae import AutoencoderKL, VAEConfig
from mmi_jax.train import background, loop
from mmi_jax.train.extensions import Run
from mmi_jax.train.metrics_log import MetricsLog
from mmi_jax.train.preemption import Preemption, Stopped
from mmi_jax.train.rng_streams import CORE_STREAMS, RngStreams
from random_params import random_params
from training_cases import (TEXT_ONLY_GROUP, WHOLE_MODEL_GROUP, flat, leaves,
                            small_config, text_only_params, two_whole_model_steps)


def logged_number(line: str, name: str) -> float:
  """The value a fit's log line gives `name` ("loss 0.12345")."""
  return float(re.search(rf"\b{name} ([-+0-9.e]+)", line).group(1))


@TEXT_ONLY_GROUP
def test_the_vision_fit_trains_the_encoder_to_name_the_attributes():
  """`stand_ins.vision_fit` (the demo's stand-in for CLIP's pretraining) changes only the
  encoder, and its classifiers learn: on one repeated batch the loss falls."""
  config = small_config("text_only")
  config.stand_ins.vision_fit.update(steps=8, batch_size=6, learning_rate=3e-3)
  pictures, labels = next(vision_fit.training_pictures(config, 6))
  assert pictures.shape == (6, 56, 56, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  assert labels.shape == (6, 3) and (labels < [4, 6, 3]).all()
  before = text_only_params()["visual_tokenizer"]
  logged = []
  fitted, stats = vision_fit.fit_vision_encoder(config, before, jax.random.key(3),
                                                log=logged.append)
  assert logged[0] == "vision fit: 8 steps; compiling its step"
  assert "vision fit 1/8" in logged[1] and "vision fit 8/8" in logged[-1]
  first_loss = logged_number(logged[1], "loss")
  assert stats["vision_fit_loss"] < first_loss
  assert set(stats) == {"vision_fit_loss", "vision_fit_shape_accuracy",
                        "vision_fit_colour_accuracy", "vision_fit_background_accuracy"}
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  moved = [path for path in want if not np.array_equal(want[path], got[path])]
  assert moved and all(path.startswith("encoder/") for path in moved)
  assert "encoder/encoder/layers_0/mlp/fc1/kernel" in moved


def test_the_vae_fit_reconstructs_the_pictures_better_and_changes_only_the_vae():
  """`stand_ins.vae_fit` (the demo's stand-in for SD's pretrained VAE): the pictures are the
  training documents' at the decoder's size, the reconstruction error falls, the result is
  float32 and deterministic, and the fitted VAE keeps its structure."""
  config = demo.get_config()
  config.stand_ins.vae_fit.update(steps=12, batch_size=4, learning_rate=4e-3, schedule="constant")
  size = config.model.image_decoder.image_size
  pictures = next(vae_fit.training_pictures(config, 4))
  assert pictures.shape == (4, size, size, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  vae = AutoencoderKL(VAEConfig.from_mapping(config.model.image_decoder.vae))
  before = random_params(jax.eval_shape(vae.init, jax.random.key(0), pictures[:1])["params"])
  logged, recorded = [], []
  fitted, stats = vae_fit.fit_vae(config, before, jax.random.key(1), log=logged.append,
                                  record=lambda step, values: recorded.append((step, values)))
  assert "vae fit 1/12" in logged[1] and "vae fit 12/12" in logged[-1]
  # The curves: every `RECORD_EVERY` steps and the last.
  assert [step for step, _ in recorded] == [10, 12]
  assert set(recorded[-1][1]) == {"loss", "reconstruction_error", "latent_std", "learning_rate"}
  assert recorded[-1][1]["reconstruction_error"] == stats["vae_reconstruction_error"]
  assert all("learning rate 4.00e-03" in line for line in logged[1:])
  first_error = logged_number(logged[1], "reconstruction_error")
  assert stats["vae_reconstruction_error"] < 0.8 * first_error
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  assert all(leaf.dtype == np.float32 and leaf.shape == want[path].shape
             for path, leaf in got.items())
  assert not np.array_equal(got["decoder/conv_out/kernel"], want["decoder/conv_out/kernel"])
  again, _ = vae_fit.fit_vae(config, before, jax.random.key(1), log=lambda message: None)
  for path, leaf in flat(again).items():
    np.testing.assert_array_equal(leaf, got[path], err_msg=path)


def test_the_fit_schedules():
  """"constant" keeps the rate; "cosine" warms up linearly, peaks at `warmup_steps` and ends
  at 2% of the rate; anything else is refused, naming the settings."""
  fit = ml_collections.ConfigDict(dict(steps=100, learning_rate=1e-3, schedule="constant",
                                       warmup_steps=10))
  schedule = fit_loop.fit_schedule(fit, "stand_ins.vae_fit")
  assert [float(schedule(i)) for i in (0, 50, 100)] == [1e-3] * 3
  fit.schedule = "cosine"
  cosine = fit_loop.fit_schedule(fit, "stand_ins.vae_fit")
  np.testing.assert_allclose([float(cosine(i)) for i in (0, 5, 10, 55, 100)],
                             [0.0, 5e-4, 1e-3, 0.51e-3, 2e-5], rtol=1e-5)
  fit.schedule = "linear"
  with pytest.raises(ValueError, match="stand_ins.vae_fit.schedule must be one of .*'linear'"):
    fit_loop.fit_schedule(fit, "stand_ins.vae_fit")


def test_a_fit_steps_at_its_schedule_s_rate():
  """`fit_loop.fit` steps at the schedule it is given and logs each step's rate: a cosine
  warm-up's first step has rate 0 and leaves the params as they were, a constant rate moves
  them."""

  def loss_fn(trained, frozen, batch, key):
    del frozen, key
    return jnp.sum(jnp.square(trained["w"] - batch)), {"distance": jnp.abs(trained["w"]).max()}

  for name, rate in (("cosine", "0.00e+00"), ("constant", "1.00e-01")):
    settings = ml_collections.ConfigDict(dict(steps=1, learning_rate=0.1, schedule=name,
                                              warmup_steps=1))
    schedule = fit_loop.fit_schedule(settings, "stand_ins.vae_fit")
    logged = []
    trained, metrics = fit_loop.fit(
        "toy fit", loss_fn, {"w": jnp.zeros(3)}, None, iter([np.ones(3, np.float32)]),
        steps=1, optimizer=optax.adam(schedule), rng=jax.random.key(0), log=logged.append,
        schedule=schedule)
    assert logged[0] == "toy fit: 1 steps; compiling its step" and len(logged) == 2
    assert logged[1].startswith("toy fit 1/1: loss 3.00000, distance 0.0")
    assert f"learning rate {rate}" in logged[1] and metrics["loss"] == 3.0
    moved = np.asarray(trained["w"])
    assert np.all(moved == 0) if name == "cosine" else np.all(moved > 0), (name, moved)

  # A stop asked for during the fit (the training job's `run.preemption.check`) ends it after
  # the step under way.
  with Preemption() as preemption:
    checked = []

    def check_stop(where):
      checked.append(where)
      if len(checked) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      preemption.check(where)

    with pytest.raises(Stopped, match=r"SIGTERM during toy fit step 2/50"):
      fit_loop.fit("toy fit", loss_fn, {"w": jnp.zeros(3)}, None,
                   iter([np.ones(3, np.float32)] * 50), steps=50,
                   optimizer=optax.adam(schedule), rng=jax.random.key(0), log=print,
                   check_stop=check_stop)
  assert checked == ["toy fit step 1/50", "toy fit step 2/50"]


def test_an_unknown_fit_schedule_stops_the_training_command_at_once(tmp_path):
  """A schedule that does not exist stops the training command before it builds anything,
  naming the fit."""
  for name in ("vae_fit", "decoder_fit", "decoder_fit_after_training"):
    bad = demo.get_config()
    bad.stand_ins[name].schedule = "linear"
    with pytest.raises(ValueError, match=f"stand_ins.{name}.schedule must be one of .*'linear'"):
      loop.train_and_evaluate(bad, str(tmp_path / name), log=lambda message: None)
    assert not (tmp_path / name).exists()


def test_the_decoder_fit_learns_to_draw_captions_and_changes_only_its_params():
  """`stand_ins.decoder_fit` (the demo's stand-in for SD's pretrained UNet): each training picture
  comes with the context of its own caption (soi, the caption reversed, `<s>`; a longer one
  than the context is refused), the noise-prediction error falls, and only the Q-Former,
  `neg_prompt_embeds` and the UNet change, in float32 and in the same structure."""
  config = small_config()
  # The fit's mechanics, on the noise's error, which 6 steps surely lower (v's may not yet).
  config.model.image_decoder.noise_schedule.prediction_type = "epsilon"
  config.stand_ins.decoder_fit.update(steps=6, batch_size=4, learning_rate=3e-3,
                                      context="stand_in", schedule="constant")
  tokens, size = config.model.tokens, config.model.image_decoder.image_size
  pictures, ids, mask = next(decoder_fit.training_pairs(config, 4))
  assert pictures.shape == (4, size, size, 3) and 0.0 <= pictures.min() < pictures.max() <= 1.0
  assert ids.shape == mask.shape == (4, config.model.image_decoder.max_context_length)
  scenes = next(pipeline.training_scene_batches(config, 4))
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  for scene, picture, row, row_mask in zip(scenes, pictures, ids, mask):
    np.testing.assert_array_equal(picture, shapes.render(scene, size) / np.float32(255))
    real = row[row_mask == 1]
    assert real[0] == tokens.soi_id and real[-1] == tokens.bos_id
    assert words.decode(real[1:-1][::-1]) == shapes.caption_of(scene)
    assert (row[len(real):] == tokens.pad_id).all() and (row_mask[len(real):] == 0).all()
  short = config.copy_and_resolve_references()
  short.model.image_decoder.max_context_length = 4
  with pytest.raises(ValueError, match="more than image_decoder.max_context_length 4"):
    next(decoder_fit.training_pairs(short, 4))

  model = build_image_decoder(config)
  contexts = np.zeros((4, ids.shape[1], config.model.llm.hidden_size), np.float32)
  before = random_params(jax.eval_shape(functools.partial(
      model.init, rng=jax.random.key(1)), jax.random.key(0), pictures, contexts, mask, None,
      None)["params"])
  logged = []
  fitted, stats = decoder_fit.fit_decoder(config, {"image_decoder": before}, jax.random.key(2),
                                          config.stand_ins.decoder_fit, "stand_ins.decoder_fit",
                                          log=logged.append)
  assert "decoder fit 1/6" in logged[1] and "decoder fit 6/6" in logged[-1]
  assert all("learning rate 3.00e-03" in line for line in logged[1:])  # its constant schedule
  first_error = logged_number(logged[1], "loss")
  assert stats["decoder_fit_error"] < 0.9 * first_error
  assert fitted.keys() == {"image_decoder"}
  moved = check_fitted_decoder(before, fitted["image_decoder"])
  assert any(path.startswith("perceiver_resampler/") for path in moved)


def check_fitted_decoder(before, after):
  """Same structure, float32; only the Q-Former, `neg_prompt_embeds` and the UNet moved.
  Returns the moved paths."""
  want, got = flat(before), flat(after)
  assert want.keys() == got.keys()
  assert all(leaf.dtype == np.float32 and leaf.shape == want[path].shape
             for path, leaf in got.items())
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(("perceiver_resampler/", "neg_prompt_embeds",
                                        "decoder/unet/")) for path in moved)
  assert {"neg_prompt_embeds", "decoder/unet/conv_in/kernel",
          "decoder/unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
          } <= moved
  return moved


def test_contexts_in_reading_order_are_the_model_s_documents():
  """`forward_order` turns the decoder's contexts (soi first) back into `<s> caption soi`."""
  config = demo.get_config()
  tokens = config.model.tokens
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  _, ids, mask = next(decoder_fit.training_pairs(config, 4))
  forward = np.asarray(decoder_fit.forward_order(ids, mask))
  for scene, row, row_mask in zip(next(pipeline.training_scene_batches(config, 4)), forward,
                                  mask):
    real = row[row_mask == 1]
    assert real[0] == tokens.bos_id and real[-1] == tokens.soi_id
    assert words.decode(real[1:-1]) == shapes.caption_of(scene)
    assert (row[len(real):] == tokens.pad_id).all()


@TEXT_ONLY_GROUP
def test_the_llm_fit_learns_the_documents_text_and_changes_only_the_language_model():
  """`stand_ins.llm_fit` (the demo's stand-in for Vicuna): rows are training documents' ids
  without `<|image|>` ids (a soi where each picture was), the text loss falls, and only the
  language model's params change."""
  config = small_config("text_only")
  config.stand_ins.llm_fit.update(steps=8, batch_size=4, learning_rate=3e-3)
  tokens = config.model.tokens
  ids, mask = next(llm_fit.training_text(config, 4))
  assert ids.shape == mask.shape == (4, config.data.sequence_length)
  words = tokenizer.shapes_tokenizer(tokens.text_vocab_size)
  layout = pipeline.document_layout(config.data)
  for index, (row, row_mask) in enumerate(zip(ids, mask)):
    document = shapes.make_document("train", index, seed=config.data.seed, **layout)
    real = row[row_mask == 1]
    assert real[0] == tokens.bos_id and real[-1] == tokens.eos_id
    assert tokens.image_id not in real and (real == tokens.soi_id).sum() == len(document.scenes)
    sentences = [segment for segment in document.segments if isinstance(segment, str)]
    assert words.decode(real[real != tokens.soi_id][1:-1]) == " ".join(sentences)
  short = config.copy_and_resolve_references()
  short.data.sequence_length = 4
  with pytest.raises(ValueError, match="more than data.sequence_length 4"):
    next(llm_fit.training_text(short, 4))

  before = text_only_params()
  logged = []
  fitted, stats = llm_fit.fit_llm(config, before, jax.random.key(0), log=logged.append)
  assert "llm fit 1/8" in logged[1] and "llm fit 8/8" in logged[-1]
  assert stats["llm_fit_text_loss"] < 0.9 * logged_number(logged[1], "loss")
  want, got = flat(before), flat(fitted)
  assert want.keys() == got.keys()
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(llm_fit.LANGUAGE_PARAMS) for path in moved)
  assert any(path.startswith("mm_decoder/") for path in moved)
  assert any(path.startswith("text_decoder/") for path in moved)


@WHOLE_MODEL_GROUP
def test_the_decoder_fit_after_training_reads_the_llm_and_changes_only_the_decoder_path(tmp_path):
  """`stand_ins.decoder_fit_after_training` (`StandIns.after_training`, a decoder fit with
  context "llm"): the trained, frozen LLM's states reach the Q-Former through
  `context_feat_proj`, which is fitted with the Q-Former, `neg_prompt_embeds` and the UNet, and
  the error falls; the LLM and every other param, the optimizer state and the step stay, in
  their dtypes and placements. A context that does not exist is refused when the extension is
  built."""
  config, setup, _, state, _ = two_whole_model_steps()
  config = config.copy_and_resolve_references()
  # The fit's mechanics on the noise's error, which 6 steps surely lower (as above), with the
  # conditioning dropped often enough that `neg_prompt_embeds` is fitted in a few steps.
  config.model.image_decoder.noise_schedule.prediction_type = "epsilon"
  config.model.image_decoder.uncond_prob = 0.5
  config.stand_ins.decoder_fit_after_training.update(steps=6, batch_size=4,
                                                     learning_rate=3e-3, schedule="constant")
  logged = []
  extension = StandIns(config)
  run = Run(config=config, workdir=str(tmp_path), setup=setup,
            rngs=RngStreams(0, ("core", CORE_STREAMS), ("stand-ins", extension.rng_streams)),
            worker=background.Worker(), logger=MetricsLog(str(tmp_path), logged.append))
  fitted = extension.after_training(run, state)
  run.logger.close()
  assert "decoder fit 1/6" in logged[1] and "decoder fit 6/6" in logged[-2]
  with open(tmp_path / "metrics.jsonl") as file:
    curves = [json.loads(line) for line in file]
  assert [(r["split"], r["step"]) for r in curves] == [("decoder_fit_after_training", 6)]
  np.testing.assert_allclose(curves[0]["loss"], logged_number(logged[-2], "loss"), atol=1e-5)
  assert os.listdir(tmp_path / "tensorboard")
  assert "image decoder fitted after training" in logged[-1]
  assert logged_number(logged[-2], "loss") < 0.9 * logged_number(logged[1], "loss")
  assert int(fitted.step) == int(state.step)
  assert fitted.opt_state is state.opt_state
  want, got = flat(state.all_params()), flat(fitted.all_params())
  assert want.keys() == got.keys()
  moved = {path for path in want if not np.array_equal(want[path], got[path])}
  assert moved and all(path.startswith(("image_decoder/perceiver_resampler/",
                                        "image_decoder/neg_prompt_embeds",
                                        "image_decoder/decoder/unet/", "context_feat_proj/"))
                       for path in moved)
  assert {path for path in want if path.startswith("context_feat_proj/")} <= moved
  assert not any(path.startswith(llm_fit.LANGUAGE_PARAMS) for path in moved)
  check_fitted_decoder(state.all_params()["image_decoder"], fitted.all_params()["image_decoder"])
  for before, after in ((state.params, fitted.params), (state.frozen, fitted.frozen)):
    for path, leaf in leaves(before).items():
      assert leaves(after)[path].dtype == leaf.dtype, path
    assert jax.tree.map(lambda x: x.sharding, before) == jax.tree.map(lambda x: x.sharding,
                                                                       after)
  bad = config.copy_and_resolve_references()
  bad.stand_ins.decoder_fit.context = "clip"
  with pytest.raises(ValueError, match="stand_ins.decoder_fit.context must be one of"):
    StandIns(bad)


def test_the_decoder_fit_after_training_reads_the_llm_with_its_own_steps_and_rates():
  config = demo.get_config()
  config.stand_ins.decoder_fit.update(steps=7, batch_size=5, learning_rate=1.0,
                                      context="stand_in")
  config.stand_ins.decoder_fit_after_training.update(steps=3, batch_size=4,
                                                     learning_rate=2e-3)
  settings = decoder_fit.after_training_settings(config)
  assert (settings.steps, settings.batch_size, settings.learning_rate, settings.context) == (
      3, 4, 2e-3, "llm")
  assert config.stand_ins.decoder_fit.context == "stand_in"


def build_image_decoder(config):
  return ImageDecoder.from_config(config.model)


@WHOLE_MODEL_GROUP
def test_the_picture_evaluation_scores_the_pictures_its_grid_shows(tmp_path):
  """The held-out picture evaluation: its grid holds a labelled row of (real, VAE
  reconstruction, generated) for each caption, its two colour accuracies are those of the
  grid's pictures, and the
  generated pictures depend on the rng and the reconstructions do not. Its programs are
  compiled ahead of time on a background thread, as the training command does."""
  config, setup, _, state, _ = two_whole_model_steps()
  config = config.copy_and_resolve_references()
  config.shapes_eval.update(caption_documents=0, generation_documents=4, generation_steps=2)
  evaluator = Evaluator(config, setup.model, setup.mesh)
  params = state.all_params()
  evaluator.compile_ahead(params, background.Worker())
  results = evaluator(params, jax.random.key(7), step=2, workdir=str(tmp_path))
  grid = np.asarray(Image.open(results["picture_grid"]))
  size = config.model.image_decoder.image_size
  assert grid.shape == (GRID_HEADER + 4 * (size + GRID_PAD),
                        GRID_PAD + 3 * (size + GRID_PAD) + GRID_TEXT_WIDTH, 3)
  tiles = [grid_tile(grid, i // 3, i % 3, size) for i in range(12)]
  # Labelled: the column titles above the pictures, each row's caption and verdict beside them.
  assert (grid[:GRID_HEADER - 2, :3 * size] < 128).any()
  text = grid[GRID_HEADER:, GRID_PAD + 3 * (size + GRID_PAD):]
  for row in range(4):
    assert (text[row * (size + GRID_PAD):(row + 1) * (size + GRID_PAD)] < 128).any(), row
  scenes = evaluator.generation_scenes
  assert results["picture_captions"] == [shapes.caption_of(scene) for scene in scenes]
  for index, scene in enumerate(scenes):
    np.testing.assert_array_equal(tiles[3 * index], shapes.render(scene, size))
  for key, column in (("reconstruction_colour_accuracy", 1), ("picture_colour_accuracy", 2)):
    hits = [shapes.classify_colour(tiles[3 * i + column], scene.background) == scene.colour
            for i, scene in enumerate(scenes)]
    assert results[key] == float(np.mean(hits)), key
  _, again = evaluator.pictures(params, jax.random.key(7))
  _, other = evaluator.pictures(params, jax.random.key(8))
  np.testing.assert_array_equal(again, grid)
  other_tiles = [grid_tile(other, i // 3, i % 3, size) for i in range(12)]
  for index in range(4):
    np.testing.assert_array_equal(other_tiles[3 * index + 1], tiles[3 * index + 1])
    assert not np.array_equal(other_tiles[3 * index + 2], tiles[3 * index + 2])


def test_decoded_captions_stop_at_the_end_of_text_or_a_new_image():
  config = small_config("text_only")
  tokens = TokenIds.from_config(config.model)
  tokenizer = shapes_tokenizer(config.model.tokens.text_vocab_size)
  words = tokenizer.encode("a red circle on a white background .")
  for stop in (tokens.eos, tokens.soi):
    ids = np.array(words + [stop] + tokenizer.encode("the same shape"))
    assert caption_words(ids, tokenizer, tokens) == "a red circle on a white background ."
