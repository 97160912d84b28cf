"""Interleaved documents of simple pictures and their captions, generated without a download.

A `Scene` is one coloured shape (circle, square, triangle, diamond) on a plain background, its
centre and size jittered; `render` draws it with PIL at any size. A `Document` is text and
scenes in reading order, as an interleaved web document is (SPEC 2):

  * one image with its caption, the image before (50%, `image_first_fraction`) or after the
    sentence:
    `a red circle on a white background . <img>`;
  * two or three images, each later image the previous one with one attribute changed and its
    sentence saying which (`the same shape , now in green .`, `the same colour , now a square .`,
    `the same shape and colour , now on a black background .`), all images before or all after
    their sentences.

`make_document(split, index)` draws document `index` of a split from its own random stream
(`np.random.default_rng([seed, split_id, index])`), so a document is the same whenever and
wherever it is made, and the train and held-out splits are independent draws. Words are
lowercase and punctuation marks are words of their own, so the vocabulary is small and fixed
(`WORDS`). `classify_colour` reads the shape's colour back from a picture, generated or not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
# The shapes' colours and the backgrounds, RGB; no shape colour is close to a background.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# Every word a document can hold, in the tokenizer's order.
WORDS = (("a", "an", "the", "same", "shape", "colour", "and", "now", "in", "on", "background", ",",
          ".") + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS))

SPLITS = {"train": 0, "held_out": 1}
MULTI_IMAGE_FRACTION = 0.4  # the rest are single-image documents
MAX_IMAGES_PER_DOCUMENT = 3
ATTRIBUTES = ("colour", "shape", "background")  # what a later image of a document changes

# The shape's bounding box, as a fraction of the image side, and its least distance to an edge.
MIN_SIZE, MAX_SIZE, MARGIN = 0.45, 0.7, 0.05


@dataclasses.dataclass(frozen=True)
class Scene:
  """One picture: a shape of one colour on a plain background.

  Attributes:
    shape: one of `SHAPES`.
    colour: a key of `COLOURS`.
    background: a key of `BACKGROUNDS`.
    centre: `(x, y)` of the shape's bounding box, as fractions of the image side.
    size: the bounding box's side as a fraction of the image side (`MIN_SIZE .. MAX_SIZE`).
  """

  shape: str
  colour: str
  background: str
  centre: tuple[float, float]
  size: float


@dataclasses.dataclass(frozen=True)
class Document:
  """An interleaved document.

  Attributes:
    segments: sentences (`str`) and pictures (`Scene`) in reading order.
    scenes: the pictures in order (the `Scene`s of `segments`).
    changes: for each picture after the first, the attribute (one of `ATTRIBUTES`) in which it
      differs from the picture before it; the others are the same.
  """

  segments: tuple[str | Scene, ...]
  scenes: tuple[Scene, ...]
  changes: tuple[str, ...] = ()

  def text(self, image_marker: str = "<img>") -> str:
    """The document as one line, each picture written as `image_marker`."""
    return " ".join(image_marker if isinstance(segment, Scene) else segment
                    for segment in self.segments)


def caption_of(scene: Scene) -> str:
  """`"a red circle on a white background ."`, `"an orange square on a black background ."`."""
  article = "an" if scene.colour[0] in "aeiou" else "a"
  return f"{article} {scene.colour} {scene.shape} on a {scene.background} background ."


def change_sentence(attribute: str, scene: Scene) -> str:
  """The sentence of a picture that is the previous one with `attribute` changed to `scene`'s."""
  if attribute == "colour":
    return f"the same shape , now in {scene.colour} ."
  if attribute == "shape":
    return f"the same colour , now a {scene.shape} ."
  if attribute == "background":
    return f"the same shape and colour , now on a {scene.background} background ."
  raise ValueError(f"unknown attribute {attribute!r}; known: {ATTRIBUTES}")


def _jitter(rng: np.random.Generator, sizes: tuple[float, float],
            centred: bool) -> tuple[tuple[float, float], float]:
  low_size, high_size = sizes
  if not MIN_SIZE <= low_size <= high_size <= 1 - 2 * MARGIN:
    raise ValueError(f"shape sizes must be {MIN_SIZE} <= min <= max <= {1 - 2 * MARGIN}, "
                     f"got {sizes}")
  size = float(rng.uniform(low_size, high_size))
  if centred:
    return (0.5, 0.5), size
  low, high = size / 2 + MARGIN, 1 - size / 2 - MARGIN
  return (float(rng.uniform(low, high)), float(rng.uniform(low, high))), size


def random_scene(rng: np.random.Generator, *, sizes: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
                 centred: bool = False) -> Scene:
  """A uniformly drawn shape, colour and background; its size uniform in `sizes`, its centre
  anywhere at least `MARGIN` inside the picture (or the picture's centre if `centred`)."""
  centre, size = _jitter(rng, sizes, centred)
  return Scene(shape=SHAPES[rng.integers(len(SHAPES))],
               colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
               background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
               centre=centre, size=size)


def changed_scene(rng: np.random.Generator, scene: Scene, attribute: str, *,
                  sizes: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
                  centred: bool = False) -> Scene:
  """`scene` with `attribute` changed to another value, centre and size drawn again (as
  `random_scene` draws them)."""
  choices = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}
  others = [value for value in choices[attribute] if value != getattr(scene, attribute)]
  centre, size = _jitter(rng, sizes, centred)
  return dataclasses.replace(scene, **{attribute: others[rng.integers(len(others))]},
                             centre=centre, size=size)


def make_document(split: str, index: int, *, seed: int = 0,
                  sizes: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
                  centred: bool = False, image_first_fraction: float = 0.5) -> Document:
  """Document `index` of `split` ("train" or "held_out"), the same on every call; `sizes` and
  `centred` as in `random_scene` (a config's `data.scene_sizes`, `data.scene_centred`);
  `image_first_fraction` (`data.image_first_fraction`) of the documents put their images
  before their sentences (captioning), the others after them (drawing from the text). The
  random draws do not depend on it: documents differ only in that order."""
  if not 0.0 <= image_first_fraction <= 1.0:
    raise ValueError(f"image_first_fraction must be in [0, 1], got {image_first_fraction}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
  rng = np.random.default_rng([seed, SPLITS[split], index])
  num_images = 1
  if rng.random() < MULTI_IMAGE_FRACTION:
    num_images = int(rng.integers(2, MAX_IMAGES_PER_DOCUMENT + 1))
  image_first = bool(rng.random() < image_first_fraction)
  layout = dict(sizes=tuple(sizes), centred=centred)
  scenes, sentences, changes = [random_scene(rng, **layout)], [], []
  sentences.append(caption_of(scenes[0]))
  for _ in range(num_images - 1):
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    scenes.append(changed_scene(rng, scenes[-1], attribute, **layout))
    sentences.append(change_sentence(attribute, scenes[-1]))
    changes.append(attribute)
  segments = []
  for scene, sentence in zip(scenes, sentences):
    segments += [scene, sentence] if image_first else [sentence, scene]
  return Document(segments=tuple(segments), scenes=tuple(scenes), changes=tuple(changes))


def render(scene: Scene, size: int) -> np.ndarray:
  """The picture as `uint8 [size, size, 3]` (PIL's ImageDraw, no anti-aliasing)."""
  image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  half = scene.size * size / 2
  x, y = scene.centre[0] * size, scene.centre[1] * size
  left, top, right, bottom = x - half, y - half, x + half, y + half
  colour = COLOURS[scene.colour]
  if scene.shape == "circle":
    draw.ellipse((left, top, right, bottom), fill=colour)
  elif scene.shape == "square":
    draw.rectangle((left, top, right, bottom), fill=colour)
  elif scene.shape == "triangle":
    draw.polygon(((x, top), (right, bottom), (left, bottom)), fill=colour)
  elif scene.shape == "diamond":
    draw.polygon(((x, top), (right, y), (x, bottom), (left, y)), fill=colour)
  else:
    raise ValueError(f"unknown shape {scene.shape!r}; known: {SHAPES}")
  return np.asarray(image, np.uint8)


def classify_colour(image: np.ndarray, background: str, *, threshold: float = 0.25
                    ) -> str | None:
  """The shape colour (a key of `COLOURS`) that most of the picture's foreground is nearest to.

  Args:
    image: `[H, W, 3]`, uint8 in [0, 255] or float in [0, 1] (a generated picture).
    background: the background it should have (a key of `BACKGROUNDS`).
    threshold: pixels nearer than this to the background colour (RGB distance, as a fraction
      of the full range) are background and do not vote, which keeps noise out.

  Returns:
    The colour with the most foreground pixels nearest to it, or None when no pixel is
    foreground.
  """
  pixels = np.asarray(image)
  pixels = (pixels.astype(np.float32) / 255.0 if np.issubdtype(pixels.dtype, np.integer)
            else pixels.astype(np.float32)).reshape(-1, 3)
  background_rgb = np.asarray(BACKGROUNDS[background], np.float32) / 255.0
  foreground = pixels[np.linalg.norm(pixels - background_rgb, axis=-1) > threshold]
  if not len(foreground):
    return None
  palette = np.asarray(list(COLOURS.values()), np.float32) / 255.0
  nearest = np.argmin(np.linalg.norm(foreground[:, None] - palette[None], axis=-1), axis=-1)
  return tuple(COLOURS)[int(np.argmax(np.bincount(nearest, minlength=len(palette))))]


__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLOURS", "Document", "MAX_IMAGES_PER_DOCUMENT",
           "MULTI_IMAGE_FRACTION", "SHAPES", "SPLITS", "Scene", "WORDS", "caption_of",
           "change_sentence", "changed_scene", "classify_colour", "make_document",
           "random_scene", "render"]
