"""Fitting the LLM to the documents' text, for runs without Vicuna's weights.

The release starts from Vicuna-13B: its LLM already writes text, and the states it gives the
image decoder (through `context_feat_proj`) already say what a caption means. Where those
weights cannot be had (the built-in demo, no download), the LLM trains from scratch
(`train.unfreeze`) and its states change throughout training: an image decoder fitted
beforehand to draw captions from them (`stand_ins.decoder_fit.context = "llm"`) would read states
the LLM no longer gives. So the training command can first fit the LLM and its text head on the
training documents' text alone, a stand-in for Vicuna's pretraining: each document as the model
reads it, `<s>`, its sentences, a soi where each picture starts and `</s>`, but without the
pictures' `<|image|>` tokens (no image is seen, so the synchronizer takes no part), under the
model's text loss (SPEC 8). `config.stand_ins.llm_fit.steps = 0` skips this.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.data import packing, pipeline, shapes, tokenizer
from mmi_jax.demo import fit_loop
from mmi_jax.models import multimodal_inputs as mm_inputs
from mmi_jax.models.mm_interleaved import text_loss, text_targets
from mmi_jax.models.multimodal_lm import MultimodalLM

# The whole model's top-level params that are the language model's (`MultimodalLM`).
LANGUAGE_PARAMS = ("mm_decoder", "text_decoder", "soi_token")


def training_text(config: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(ids [batch_size, L], attention mask [batch_size, L])`: the next training documents'
  token ids without `<|image|>` ids, one a row, right-padded to `data.sequence_length`."""
  tokens = mm_inputs.TokenIds.from_config(config.model)
  words = tokenizer.shapes_tokenizer(config.model.tokens.text_vocab_size)
  length = int(config.data.sequence_length)
  layout = pipeline.document_layout(config.data)
  index = 0
  while True:
    ids = np.full((batch_size, length), tokens.pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
      document = shapes.make_document("train", index, seed=config.data.seed, **layout)
      index += 1
      text = [i for i in packing.document_tokens(document, words, tokens)[0] if i != tokens.image]
      if len(text) > length:
        raise ValueError(f"llm fit: training document {index - 1} has {len(text)} text tokens, "
                         f"more than data.sequence_length {length}")
      ids[row, :len(text)], mask[row, :len(text)] = text, 1
    yield ids, mask


def fit_llm(config: Any, params: Any, rng: jax.Array, log: Callable[[str], None] = print,
            record: fit_loop.Record | None = None,
            check_stop: fit_loop.CheckStop | None = None) -> tuple[Any, dict[str, float]]:
  """`config.stand_ins.llm_fit.steps` Adam steps of the LLM and its text head on the text loss.

  Args:
    config: the whole config (`stand_ins.llm_fit`: steps, batch_size, learning_rate;
      `model.llm`, `model.tokens`, `data.sequence_length`).
    params: the whole model's params; only `LANGUAGE_PARAMS` are read and changed.
    rng: the fit's stream (the text loss draws nothing).
  Returns:
    `(params, stats)`: the whole model's params (host arrays) with the language model's
    fitted in float32, and the last batch's text loss.
  """
  settings = config.stand_ins.llm_fit
  language = MultimodalLM.from_config(config.model)
  tokens = language.tokens
  trained = {name: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params[name])
             for name in LANGUAGE_PARAMS}

  def loss_fn(trained, frozen, batch, key):
    del frozen, key  # the whole language model trains; no random draws
    ids, mask = batch
    logits = language.apply({"params": trained}, ids, mask)["logits"]
    return text_loss(logits, text_targets(ids, mask, tokens))[0], {}

  trained, metrics = fit_loop.fit(
      "llm fit", loss_fn, trained, None, training_text(config, int(settings.batch_size)),
      steps=int(settings.steps), optimizer=optax.adam(float(settings.learning_rate)), rng=rng,
      log=log, record=record, check_stop=check_stop)
  return dict(params, **jax.device_get(trained)), {"llm_fit_text_loss": metrics["loss"]}


__all__ = ["LANGUAGE_PARAMS", "fit_llm", "training_text"]
