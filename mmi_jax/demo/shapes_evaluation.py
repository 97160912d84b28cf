"""The demo's held-out evaluation on the built-in shapes documents, as a training-loop extension.

  * Caption accuracy: each held-out document's first picture is shown as `<s> soi <|image|>...`
    and the model decodes greedily (KV cache, MMFS active:
    `mmi_jax.generate.decoding.greedy_decode`) until `</s>` or soi; a caption counts when its
    words equal the picture's caption exactly. Per-attribute accuracies (shape, colour,
    background word) are reported too.
  * Picture colour: the model draws the picture for `<s> caption soi` (the release's
    inference: the LLM's hidden states up to the soi condition the image decoder, sampled with
    classifier-free guidance, `mmi_jax.generate.image_generation`); it counts when the colour
    most of the shape's pixels are nearest to is the caption's (`shapes.classify_colour`). The
    same count on the VAE's reconstructions of the real pictures (encoded to the latent mean,
    decoded) is what the diffusion model could at best reach with this VAE.

`Evaluator` compiles each function once, when first called or ahead of time (`compile_ahead`,
which the training loop runs in a background thread while it trains); its calls are
collective (every process of a multi-host run calls them with the same held-out data,
replicated). `ShapesEvaluation` runs it at the training loop's evaluations (a config selects it
in `config.train.extensions`; its settings are `config.shapes_eval`) and writes each picture
grid to `workdir/samples/` and TensorBoard.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image, ImageDraw, ImageFont

from mmi_jax import sharding
from mmi_jax.data import packing, pipeline, shapes
from mmi_jax.data.tokenizer import shapes_tokenizer
from mmi_jax.generate import decoding, image_generation
from mmi_jax.models import multimodal_inputs as mm_inputs
from mmi_jax.models.batch import Batch
from mmi_jax.models.image_decoder import ImageDecoder
from mmi_jax.models.mm_interleaved import MMInterleaved
from mmi_jax.train.background import Worker
from mmi_jax.train.extensions import Extension, Run


def held_out_scenes(config: Any, count: int) -> list[shapes.Scene]:
  """The first picture of each of the first `count` held-out documents."""
  layout = pipeline.document_layout(config.data)
  return [shapes.make_document("held_out", index, seed=config.data.seed, **layout).scenes[0]
          for index in range(count)]


def caption_words(ids: np.ndarray, tokenizer: Any, tokens: mm_inputs.TokenIds) -> str:
  """Decoded ids up to the first `</s>` or soi."""
  ids = [int(i) for i in ids]
  for stop in (tokens.eos, tokens.soi):
    if stop in ids:
      ids = ids[:ids.index(stop)]
  return tokenizer.decode(ids)


GRID_PAD = 2  # pixels between the grid's pictures
GRID_HEADER = 16  # pixels of the column titles above the first row
GRID_COLUMNS = ("real", "VAE", "drawn")
GRID_TEXT_WIDTH = 260  # pixels of each row's caption and verdict


def grid_tile(grid: np.ndarray, row: int, column: int, size: int) -> np.ndarray:
  """The picture of `row` and `column` (0: real, 1: VAE, 2: drawn) of a `labelled_grid`."""
  top = GRID_HEADER + row * (size + GRID_PAD)
  left = GRID_PAD + column * (size + GRID_PAD)
  return grid[top:top + size, left:left + size]


def labelled_grid(triples: list[list[np.ndarray]], captions: list[str],
                  verdicts: list[str]) -> np.ndarray:
  """One row per caption: its real picture, the VAE's reconstruction of it and the drawn
  picture (`[size, size, 3]` uint8 each) under the column titles, then the caption and
  `verdicts[i]` ("colour right" ...) in text; on white, `[height, width, 3]` uint8."""
  size = triples[0][0].shape[0]
  pictures_width = GRID_PAD + len(GRID_COLUMNS) * (size + GRID_PAD)
  grid = np.full((GRID_HEADER + len(triples) * (size + GRID_PAD),
                  pictures_width + GRID_TEXT_WIDTH, 3), 255, np.uint8)
  for row, triple in enumerate(triples):
    for column, picture in enumerate(triple):
      grid_tile(grid, row, column, size)[...] = picture
  image = Image.fromarray(grid)
  draw, font = ImageDraw.Draw(image), ImageFont.load_default()
  for column, title in enumerate(GRID_COLUMNS):
    draw.text((GRID_PAD + column * (size + GRID_PAD) + 1, 2), title, fill=(0, 0, 0), font=font)
  for row, (caption, verdict) in enumerate(zip(captions, verdicts)):
    top = GRID_HEADER + row * (size + GRID_PAD)
    draw.text((pictures_width + 4, top + 2), caption, fill=(0, 0, 0), font=font)
    draw.text((pictures_width + 4, top + size // 2 + 2), verdict, fill=(90, 90, 90), font=font)
  return np.asarray(image)


class Evaluator:
  """Caption accuracy and picture colour on held-out documents, for one model and mesh."""

  def __init__(self, config: Any, model: MMInterleaved, mesh: jax.sharding.Mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.tokens = mm_inputs.TokenIds.from_config(config.model)
    self.tokenizer = shapes_tokenizer(config.model.tokens.text_vocab_size)
    evaluation = config.shapes_eval
    self.caption_scenes = held_out_scenes(config, evaluation.caption_documents)
    self.generation_scenes = held_out_scenes(config, evaluation.generation_documents)
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._compiled: dict[str, concurrent.futures.Future] = {}

  def _put(self, tree: Any) -> Any:
    """Host arrays, identical on every process, as replicated global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), tree)

  def _replicated_like(self, tree: Any) -> Any:
    """Shape structs of `_put(tree)`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=self._replicated), tree)

  def _programs(self) -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    """`{name: (jitted function, its arguments after params, as shape structs)}` of the
    evaluations this config runs."""
    programs = {}
    if self.caption_scenes:
      ids, images, _ = self.caption_prompts()
      programs["captions"] = (self._decode_captions, self._replicated_like((ids, images)))
    if self.model.image_decoder is not None and self.generation_scenes:
      size = self.config.model.image_decoder.image_size
      pixels = np.zeros((len(self.generation_scenes), size, size, 3), np.float32)
      rng = jax.random.key_data(jax.random.key(0))
      programs["generate"] = (self._generate,
                              self._replicated_like((self.generation_batch(), rng)))
      programs["reconstruct"] = (self._reconstruct, self._replicated_like((pixels,)))
    return programs

  def compile_ahead(self, params: Any, worker: Worker) -> None:
    """Lowers the evaluation's programs here for params shaped and placed like `params`
    (`jax.ShapeDtypeStruct`s with shardings, or arrays) and compiles them on `worker`; the
    evaluations then run those."""
    for name, (function, args) in self._programs().items():
      with sharding.use_mesh(self.mesh):
        lowered = function.lower(params, *args)
      self._compiled[name] = worker.submit(lowered.compile)

  def _program(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """The program compiled ahead of time for `name` (waiting for it), else `function`."""
    return self._compiled[name].result() if name in self._compiled else function

  # --- captions --------------------------------------------------------------------------

  def caption_prompts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(token_ids [B, 2 + T], images [B, Hv, Wv, 3], expected captions)`."""
    size = self.config.model.vision_encoder.image_size
    tokens = self.tokens
    prompt = [tokens.bos, tokens.soi] + [tokens.image] * tokens.tokens_per_image
    ids = np.tile(np.asarray(prompt, np.int32), (len(self.caption_scenes), 1))
    images = np.stack([shapes.render(scene, size) for scene in self.caption_scenes])
    return ids, images.astype(np.float32) / 255, [shapes.caption_of(s) for s in
                                                   self.caption_scenes]

  @functools.cached_property
  def _decode_captions(self):
    model = self.model
    steps = int(self.config.shapes_eval.max_caption_tokens)

    def decode(params, ids, images):
      rows = ids.shape[0]
      _, image_embeds, features, slot_mask = model.apply(
          {"params": params}, images, jnp.arange(rows), jnp.ones((rows,), bool), rows, slots=1,
          method=MMInterleaved.read_images)
      generated, _ = decoding.greedy_decode(
          model.language, params, ids, jnp.ones_like(ids), image_embeds, features, slot_mask,
          steps=steps, max_length=ids.shape[1] + steps)
      return generated

    return jax.jit(decode, out_shardings=self._replicated)

  def captions(self, params: Any) -> dict[str, Any]:
    """Greedy captions of the held-out pictures and their accuracy."""
    ids, images, expected = self.caption_prompts()
    with sharding.use_mesh(self.mesh):
      decode = self._program("captions", self._decode_captions)
      generated = np.asarray(decode(params, *self._put((ids, images))))
    predicted = [caption_words(row, self.tokenizer, self.tokens) for row in generated]
    exact = [p == e for p, e in zip(predicted, expected)]
    results = {"caption_accuracy": float(np.mean(exact))}
    for attribute in ("shape", "colour", "background"):
      hits = [getattr(scene, attribute) in p.split()
              for scene, p in zip(self.caption_scenes, predicted)]
      results[f"caption_{attribute}_accuracy"] = float(np.mean(hits))
    results["examples"] = [{"expected": e, "predicted": p}
                           for e, p in list(zip(expected, predicted))[:8]]
    return results

  # --- pictures --------------------------------------------------------------------------

  def generation_batch(self) -> Batch:
    """One row per caption: `<s> caption soi <|image|>...</s>` with a placeholder picture."""
    documents = [shapes.Document(segments=(shapes.caption_of(scene), scene), scenes=(scene,),
                                 changes=()) for scene in self.generation_scenes]
    length = max(len(packing.document_tokens(d, self.tokenizer, self.tokens)[0])
                 for d in documents)
    batch, stats = packing.pack_rows(documents, rows=len(documents), sequence_length=length,
                                     images_per_row=1, model_config=self.config.model,
                                     tokenizer=self.tokenizer, documents_per_row=1)
    if stats["skipped"]:
      raise ValueError(f"generation prompts could not be packed: {stats}")
    # The picture to draw is unknown to the model: its pixels are a blank placeholder.
    return batch.replace(images=np.zeros_like(batch.images),
                         decoder_images=np.zeros_like(batch.decoder_images))

  @functools.cached_property
  def _generate(self):
    model, evaluation = self.model, self.config.shapes_eval

    def generate(params, batch, rng_data):
      rng = jax.random.wrap_key_data(rng_data)
      inputs = model.apply({"params": params}, batch, method=MMInterleaved.image_decoder_inputs)
      return image_generation.generate_images(
          model.image_decoder, params["image_decoder"], inputs["context"],
          inputs["context_mask"], inputs["mmfs_features"], inputs["mmfs_mask"], rng,
          num_steps=int(evaluation.generation_steps),
          guidance_scale=float(evaluation.guidance_scale),
          sampler=self.config.generate.sampler)

    return jax.jit(generate, out_shardings=self._replicated)

  @functools.cached_property
  def _reconstruct(self):
    decoder = self.model.image_decoder

    def reconstruct(params, images):
      variables = {"params": params["image_decoder"]}
      latents = decoder.apply(variables, images, method=ImageDecoder.encode_latents)
      return decoder.apply(variables, latents, method=ImageDecoder.decode_latents)

    return jax.jit(reconstruct, out_shardings=self._replicated)

  def _colour_hits(self, pictures: np.ndarray) -> list[bool]:
    return [shapes.classify_colour(picture, scene.background) == scene.colour
            for scene, picture in zip(self.generation_scenes, pictures)]

  def pictures(self, params: Any, rng: jax.Array) -> tuple[dict[str, Any], np.ndarray]:
    """Generated pictures of held-out captions and the VAE's reconstructions of the real ones:
    their colour accuracies and a labelled grid (uint8): a row of (real, reconstructed,
    drawn) per caption, with the caption and whether each colour is right (`labelled_grid`)."""
    batch = self.generation_batch()
    size = self.config.model.image_decoder.image_size
    real = np.stack([shapes.render(scene, size) for scene in self.generation_scenes])
    with sharding.use_mesh(self.mesh):
      generate = self._program("generate", self._generate)
      generated = np.asarray(generate(params, *self._put((batch, jax.random.key_data(rng)))))
      real_pixels = self._put((real / 255.0).astype(np.float32))
      reconstruct = self._program("reconstruct", self._reconstruct)
      reconstructed = np.asarray(reconstruct(params, real_pixels))
    to_uint8 = lambda images: (images * 255).round().astype(np.uint8)  # noqa: E731
    generated, reconstructed = to_uint8(generated), to_uint8(reconstructed)
    triples = [list(images) for images in zip(real, reconstructed, generated)]
    drawn_hits, vae_hits = self._colour_hits(generated), self._colour_hits(reconstructed)
    captions = [shapes.caption_of(s) for s in self.generation_scenes]
    verdicts = [f"colour: drawn {'right' if drawn else 'wrong'}, VAE {'right' if vae else 'wrong'}"
                for drawn, vae in zip(drawn_hits, vae_hits)]
    results = {"picture_colour_accuracy": float(np.mean(drawn_hits)),
               "reconstruction_colour_accuracy": float(np.mean(vae_hits)),
               "picture_captions": captions}
    return results, labelled_grid(triples, captions, verdicts)

  def __call__(self, params: Any, rng: jax.Array, step: int, workdir: str | None,
               check_stop: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both evaluations (each skipped when its document count is 0); writes the picture grid
    to `workdir/samples/step_<step>.png`. `check_stop(where)` is called between them (it
    raises to stop: the training job's `run.preemption.check`)."""
    results = self.captions(params) if self.caption_scenes else {}
    if check_stop is not None:
      check_stop(f"the captions of step {step}'s evaluation")
    if self.model.image_decoder is not None and self.generation_scenes:
      pictures, grid = self.pictures(params, rng)
      results.update(pictures)
      if workdir is not None and jax.process_index() == 0:
        directory = os.path.join(workdir, "samples")
        os.makedirs(directory, exist_ok=True)
        results["picture_grid"] = os.path.join(directory, f"step_{step:06d}.png")
        Image.fromarray(grid).save(results["picture_grid"])
    return results


class ShapesEvaluation(Extension):
  """The training loop's evaluation of the demo: `Evaluator` at every evaluation step."""

  section = "shapes_eval"
  rng_streams = {"shapes_evaluation": 7}

  @classmethod
  def settings(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        caption_documents=64,  # single-image documents whose caption is decoded greedily
        max_caption_tokens=16,
        generation_documents=16,  # captions whose picture is generated (0: none)
        generation_steps=30,  # sampler steps (`config.generate.sampler`)
        guidance_scale=7.5,
    ))

  def __init__(self, config: Any):
    super().__init__(config)
    self._evaluator: Evaluator | None = None

  def _evaluator_of(self, run: Run) -> Evaluator:
    if self._evaluator is None:
      self._evaluator = Evaluator(run.config, run.setup.model, run.setup.mesh)
    return self._evaluator

  def compile_ahead(self, run: Run) -> None:
    self._evaluator_of(run).compile_ahead(run.setup.abstract_state().all_params(), run.worker)

  def evaluate(self, run: Run, params: Any, step: int) -> dict[str, Any]:
    settings, started = self.config.shapes_eval, time.perf_counter()
    pictures = settings.generation_documents if run.setup.model.image_decoder is not None else 0
    run.logger.log(f"evaluating step {step}: {settings.caption_documents} captions decoded, "
                   f"{pictures} pictures drawn ({settings.generation_steps} sampler steps each)")
    results = self._evaluator_of(run)(params, run.rngs.key("shapes_evaluation", step), step,
                                      run.workdir, check_stop=run.preemption.check)
    if "picture_grid" in results:
      run.logger.image(step, "eval/pictures", np.asarray(Image.open(results["picture_grid"])))
    run.logger.log(f"evaluated step {step} in {time.perf_counter() - started:.0f} s")
    return results


__all__ = ["Evaluator", "GRID_COLUMNS", "ShapesEvaluation", "caption_words", "grid_tile",
           "held_out_scenes", "labelled_grid"]
