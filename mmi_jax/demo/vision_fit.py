"""Fitting the visual tokenizer's encoder to the pictures, for runs without CLIP's weights.

The release takes CLIP's pretrained ViT-L/14 and keeps its trunk frozen. Where those weights
cannot be had (the built-in demo, no download), a random ViT has not learned to see, and
learning it through the captions alone is slow: a step holds a few captioned pictures, and
each caption says the shape once. So the training command first fits the encoder (ViT trunk
and adapter) to the training pictures, a supervised stand-in for CLIP's pretraining: a linear
classifier of each attribute a caption names (shape, colour, background) reads the mean of the
encoder's final patch features (`image_embeds`, what the perceiver resampler reads), and the
summed cross-entropies train the encoder and the classifiers. The classifiers are then
discarded; the trunk stays frozen in training as the release's does, unless `train.unfreeze`
says otherwise. `config.stand_ins.vision_fit.steps = 0` skips this.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmi_jax.data import pipeline, shapes
from mmi_jax.demo import fit_loop
from mmi_jax.models.visual_tokenizer import VisualTokenizer

# What the classifiers name, in the order of their logits.
ATTRIBUTES = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS),
              "background": tuple(shapes.BACKGROUNDS)}


def training_pictures(config: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(pictures [batch_size, H, W, 3] in [0, 1], labels [batch_size, 3])` of the training
  documents' pictures at the encoder's size; labels index `ATTRIBUTES`' values."""
  size = config.model.vision_encoder.image_size
  for scenes in pipeline.training_scene_batches(config, batch_size):
    pictures = np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32)
    labels = np.array([[values.index(getattr(scene, name)) for name, values in ATTRIBUTES.items()]
                       for scene in scenes], np.int32)
    yield pictures / 255, labels


def fit_vision_encoder(config: Any, tokenizer_params: Any, rng: jax.Array,
                       log: Callable[[str], None] = print,
                       record: fit_loop.Record | None = None,
                       check_stop: fit_loop.CheckStop | None = None
                       ) -> tuple[Any, dict[str, float]]:
  """`config.stand_ins.vision_fit.steps` AdamW steps of the encoder and attribute classifiers.

  Args:
    config: the whole config (`stand_ins.vision_fit`: steps, batch_size, learning_rate;
      `model.vision_encoder`, `model.vision_adapter`, `model.visual_tokenizer`).
    tokenizer_params: the visual tokenizer's params (`params["visual_tokenizer"]`); only its
      `encoder` subtree changes.
    rng: initialises the classifiers.
  Returns:
    `(params, stats)`: the visual tokenizer's params (float32 host arrays) with the fitted
    encoder, and the last batch's loss and per-attribute accuracy.
  """
  settings = config.stand_ins.vision_fit
  tokenizer = VisualTokenizer.from_config(config.model)
  width = config.model.vision_encoder.hidden_size
  sizes = [len(values) for values in ATTRIBUTES.values()]
  classifiers = {"kernel": jax.random.normal(rng, (width, sum(sizes)), jnp.float32)
                 / np.sqrt(width), "bias": jnp.zeros((sum(sizes),), jnp.float32)}
  splits = np.cumsum(sizes)[:-1]

  def loss_fn(trained, others, batch, key):
    del key  # no random draws
    pictures, labels = batch
    params = dict(others, encoder=trained["encoder"])
    features = tokenizer.apply({"params": params}, pictures)["image_embeds"].mean(axis=1)
    logits = features @ trained["classifiers"]["kernel"] + trained["classifiers"]["bias"]
    losses, accuracies = [], {}
    for index, (name, part) in enumerate(zip(ATTRIBUTES, jnp.split(logits, splits, axis=-1))):
      losses.append(optax.softmax_cross_entropy_with_integer_labels(part, labels[:, index]))
      accuracies[f"{name}_accuracy"] = jnp.mean(jnp.argmax(part, axis=-1) == labels[:, index])
    return sum(loss.mean() for loss in losses), accuracies

  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.device_get(tokenizer_params))
  others = {name: value for name, value in params.items() if name != "encoder"}
  optimizer = optax.adamw(float(settings.learning_rate), b1=0.9, b2=0.995, eps=1e-6,
                          weight_decay=0.05)
  trained, metrics = fit_loop.fit(
      "vision fit", loss_fn, {"encoder": params["encoder"], "classifiers": classifiers}, others,
      training_pictures(config, int(settings.batch_size)), steps=int(settings.steps),
      optimizer=optimizer, rng=rng, log=log, record=record,
      check_stop=check_stop)
  stats = {f"vision_fit_{name}": value for name, value in metrics.items()}
  return jax.device_get(dict(others, encoder=trained["encoder"])), stats


__all__ = ["ATTRIBUTES", "fit_vision_encoder", "training_pictures"]
