"""The demo's stand-ins for the pretrained weights it cannot download, as a training extension.

The release starts from CLIP's ViT, Stable Diffusion's VAE and UNet, and Vicuna. The demo
fits stand-ins for them on a fresh start, before the first train step (`prepare_params`):
the vision encoder (`vision_fit`), the VAE (`vae_fit`), the LLM (`llm_fit`), then the image
decoder's Q-Former and UNet (`decoder_fit`); and, after the last step, the image decoder again
through the trained, frozen LLM (`after_training`, `decoder_fit_after_training`), as SD's UNet
was trained on a frozen text encoder's states. A config selects it in
`config.train.extensions`; each fit's settings are in `config.stand_ins` (`settings()`), and a
fit with `steps = 0` does not run. The fits of the image decoder's parts run only for a model
that has one. Each fit logs its progress (rate, time left) and writes its curves to the job's
`metrics.jsonl` (split: the fit's name) and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from mmi_jax.demo import decoder_fit, fit_loop
from mmi_jax.demo.llm_fit import fit_llm
from mmi_jax.demo.vae_fit import fit_vae
from mmi_jax.demo.vision_fit import fit_vision_encoder
from mmi_jax.train.extensions import Extension, Run
from mmi_jax.train.train_state import TrainState
from mmi_jax.trainable import split_params


class StandIns(Extension):
  """The stand-in fits at the training loop's `prepare_params` and `after_training`."""

  section = "stand_ins"
  # The vision fit draws the train steps' key (its classifiers' init): the demo's recorded
  # results come from these draws, and a stream of its own changes them more than the
  # demo's margins allow (experiments/PERFORMANCE.md, issue 25).
  rng_streams = {"vae_fit": 1, "decoder_fit": 3, "llm_fit": 4, "decoder_fit_after_training": 5,
                 "vision_fit": "train_steps"}

  @classmethod
  def settings(cls) -> ml_collections.ConfigDict:
    # `schedule`: "constant" or "cosine" with `warmup_steps` (`fit_loop.fit_schedule`).
    schedule = dict(schedule="constant", warmup_steps=0)
    return ml_collections.ConfigDict(dict(
        # The vision encoder (ViT and adapter) classifies the pictures' attributes.
        vision_fit=dict(steps=0, batch_size=16, learning_rate=1e-3),
        # The VAE as an autoencoder; it stays frozen in training, as SD's.
        vae_fit=dict(steps=0, batch_size=16, learning_rate=1e-3, kl_weight=1e-6, **schedule),
        # The LLM and its text head on the documents' text, images left out.
        llm_fit=dict(steps=0, batch_size=16, learning_rate=1e-3),
        # The image decoder's Q-Former and UNet draw the pictures from their captions'
        # contexts: `context` "stand_in" (learned vectors for the LLM's states) or "llm" (the
        # frozen LLM's states through `context_feat_proj`, fitted too).
        decoder_fit=dict(steps=0, batch_size=16, learning_rate=1e-3, context="stand_in",
                         **schedule),
        # The same after the last train step, through the trained LLM (context "llm"); the
        # last step is saved after it.
        decoder_fit_after_training=dict(steps=0, batch_size=16, learning_rate=1e-3,
                                        **schedule),
    ))

  def __init__(self, config: Any):
    super().__init__(config)
    settings = config.stand_ins
    fit_loop.fit_schedule(settings.vae_fit, "stand_ins.vae_fit")
    decoder_fit.check_settings(settings.decoder_fit, "stand_ins.decoder_fit")
    decoder_fit.check_settings(decoder_fit.after_training_settings(config),
                               "stand_ins.decoder_fit_after_training")
    self._has_image_decoder = config.model.get("image_decoder") is not None

  def prepare_params(self, run: Run, params: Any) -> Any:
    """The whole model's params (host arrays) with the configured stand-ins fitted."""
    config, settings, log = self.config, self.config.stand_ins, run.logger.log
    if settings.vision_fit.steps:
      params = jax.device_get(params)
      params["visual_tokenizer"], stats = fit_vision_encoder(
          config, params["visual_tokenizer"], run.rngs.key("vision_fit"), log=log,
          record=_recorder(run, "vision_fit"),
          check_stop=run.preemption.check)
      log(f"vision encoder fitted: {stats}")
    if settings.vae_fit.steps and self._has_image_decoder:
      params = jax.device_get(params)
      decoder = params["image_decoder"]["decoder"]
      decoder["vae"], stats = fit_vae(config, decoder["vae"], run.rngs.key("vae_fit"), log=log,
                                      record=_recorder(run, "vae_fit"),
                                      check_stop=run.preemption.check)
      log(f"vae fitted: {stats}")
    if settings.llm_fit.steps:
      params, stats = fit_llm(config, jax.device_get(params), run.rngs.key("llm_fit"), log=log,
                              record=_recorder(run, "llm_fit"),
                              check_stop=run.preemption.check)
      log(f"llm fitted: {stats}")
    if settings.decoder_fit.steps and self._has_image_decoder:
      params, stats = decoder_fit.fit_decoder(
          config, jax.device_get(params), run.rngs.key("decoder_fit"), settings.decoder_fit,
          "stand_ins.decoder_fit", log=log, record=_recorder(run, "decoder_fit"),
          check_stop=run.preemption.check)
      log(f"image decoder fitted: {stats}")
    return params

  def after_training(self, run: Run, state: TrainState) -> TrainState:
    """`state` with the image decoder fitted through its trained, frozen LLM; the optimizer
    state, the step and every other param are kept, each param in its dtype and placement."""
    if not (self.config.stand_ins.decoder_fit_after_training.steps and self._has_image_decoder):
      return state
    params = jax.device_get(state.all_params())
    fitted, stats = decoder_fit.fit_decoder(
        self.config, params, run.rngs.key("decoder_fit_after_training"),
        decoder_fit.after_training_settings(self.config),
        "stand_ins.decoder_fit_after_training", log=run.logger.log,
        record=_recorder(run, "decoder_fit_after_training"),
        check_stop=run.preemption.check)
    run.logger.log(f"image decoder fitted after training: {stats}")
    # Back in each param's own dtype (the fit works in float32) and placement.
    fitted = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), fitted, params)
    trainable, frozen = split_params(fitted, run.setup.trainable_mask)
    shardings = run.setup.state_shardings
    return state.replace(params=jax.device_put(trainable, shardings.params),
                         frozen=jax.device_put(frozen, shardings.frozen))


def _recorder(run: Run, fit: str) -> fit_loop.Record:
  """A fit's curves in the job's `metrics.jsonl` (split `fit`) and TensorBoard (`fit/...`)."""
  return lambda step, values: run.logger.scalars(step, values, fit)


__all__ = ["StandIns"]
