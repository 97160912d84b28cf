"""The training and held-out data as a `grain.MapDataset` of packed batches, one per step.

Element `step` of `make_dataset(config, split, process_index=p, process_count=P)` is the pair
`(batch, stats)`:

  * `batch`: process p's share of the step's global batch, an `mmi_jax.models.batch.Batch` of NumPy
    arrays with `R = config.data.batch_size // P` rows of `config.data.sequence_length` tokens
    and `R * image_slots_per_row(config.data)` image slots (`packing.pack_rows`). Its
    `image_sequence_ids` are *global* row indices (p * R + local row), so concatenating the
    processes' batches field by field, in process order, gives exactly the one-process batch
    (`jax.make_array_from_process_local_data` assembles that global batch). `pack_rows` has
    validated the rows (`mmi_jax.batch.validate`) with local indices, before that shift.
  * `stats`: `pack_rows`' counts for these rows (documents, packed, skipped, reasons, tokens,
    images) plus `step`; documents that could not be placed are counted there, never raised on.

The global document order is the split's indices, shuffled with `config.data.seed` and repeated
indefinitely (a new order each epoch) for "train", in order and once for "held_out". Step s
takes the next `batch_size * documents_per_row` of them; global row r holds documents
`r * documents_per_row ...` of the step, so each process generates and renders only its own
rows. Everything is a function of (config, split, step): iterating twice, restoring an iterator
(`get_state` / `set_state`, or Orbax with `grain.checkpoint.CheckpointSave` /
`CheckpointRestore`) or changing the process count gives the same data. The last held-out step
may hold fewer documents than the others; its remaining rows are padding (attention mask 0).
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from mmi_jax.data import packing, shapes
from mmi_jax.data.tokenizer import shapes_tokenizer

DATASETS = ("shapes",)


def image_slots_per_row(data_config: Any) -> int:
  """Image slots per row: room for `documents_per_row` documents of the most images, capped at
  `max_images_per_sequence`.
  """
  return min(data_config.max_images_per_sequence,
             shapes.MAX_IMAGES_PER_DOCUMENT * data_config.documents_per_row)


def document_layout(data_config: Any) -> dict[str, Any]:
  """`shapes.make_document`'s layout keywords from a config's `data` section (`scene_sizes`,
  `scene_centred`, `image_first_fraction`)."""
  return dict(sizes=tuple(float(size) for size in data_config.scene_sizes),
              centred=bool(data_config.scene_centred),
              image_first_fraction=float(data_config.image_first_fraction))


def training_scene_batches(config: Any, batch_size: int, *, seed_offset: int = 0
                           ) -> Iterator[list[shapes.Scene]]:
  """Endless batches of `batch_size` training pictures (for `mmi_jax.demo.vae_fit`,
  `vision_fit` and `decoder_fit`): each from the next documents, in order, whole but for the
  pictures past `batch_size`, which are dropped."""
  layout = document_layout(config.data)
  index = 0
  while True:
    scenes = []
    while len(scenes) < batch_size:
      scenes += shapes.make_document("train", index, seed=config.data.seed + seed_offset,
                                     **layout).scenes
      index += 1
    yield scenes[:batch_size]


class _PackRows:
  """One step's global document indices -> this process's `(Batch, stats)`."""

  def __init__(self, config: Any, split: str, process_index: int, process_count: int):
    data = config.data
    self._model_config = config.model
    self._split, self._seed = split, data.seed
    self._layout = document_layout(data)
    self._documents_per_row = data.documents_per_row
    self._rows = data.batch_size // process_count
    self._first_row = process_index * self._rows
    self._sequence_length = data.sequence_length
    self._images_per_row = image_slots_per_row(data)
    self._tokenizer = shapes_tokenizer(config.model.tokens.text_vocab_size)
    self._tokenizer.check_compatible(config.model.tokens)

  def __call__(self, step: int, document_indices: np.ndarray) -> tuple[Any, dict[str, Any]]:
    first = self._first_row * self._documents_per_row
    local = document_indices[first:first + self._rows * self._documents_per_row]
    documents = [shapes.make_document(self._split, int(index), seed=self._seed, **self._layout)
                 for index in local]
    batch, stats = packing.pack_rows(
        documents, rows=self._rows, sequence_length=self._sequence_length,
        images_per_row=self._images_per_row, model_config=self._model_config,
        tokenizer=self._tokenizer, documents_per_row=self._documents_per_row)
    # Global row indices; padding slots keep row 0, as in the one-process batch.
    sequence_ids = np.where(batch.image_valid, batch.image_sequence_ids + self._first_row, 0)
    batch = batch.replace(image_sequence_ids=sequence_ids.astype(np.int32))
    return batch, dict(stats, step=int(step))


class _Steps(grain.MapDataset):
  """The packed steps; `iter()` reads them with a few threads and elements ahead.

  (A plain `MapDataset` iterates with grain's default 16 threads and 500 elements ahead.)
  """

  def __init__(self, parent: grain.MapDataset, read_options: grain.ReadOptions):
    super().__init__(parent)
    self._read_options = read_options

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index]

  def __iter__(self) -> grain.DatasetIterator:
    return self.to_iter_dataset(self._read_options).__iter__()

  def __str__(self) -> str:
    return f"ShapesSteps(read_options={self._read_options})"


def make_dataset(config: Any, split: str, *, process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2, prefetch: int = 4) -> grain.MapDataset:
  """This process's steps of `split` ("train" or "held_out") of `config.data.dataset`.

  Args:
    config: the whole config (`config.data`: dataset, batch_size (global rows per step),
      sequence_length, documents_per_row, seed, train_documents, held_out_documents,
      max_images_per_sequence; `config.model` for the token ids and image sizes).
    split: "train" (shuffled, repeated indefinitely) or "held_out" (in order, once).
    process_index, process_count: this process and how many share each step's rows
      (`jax.process_index()`, `jax.process_count()`); batch_size must divide evenly.
    num_threads, prefetch: grain's reading threads and elements read ahead by `iter()`.

  Returns:
    A `grain.MapDataset` of `(batch, stats)` (see the module docstring); `iter()` gives a
    `grain.DatasetIterator` whose `get_state()` / `set_state()` restore its position.
  """
  data = config.data
  if data.dataset not in DATASETS:
    raise ValueError(f"unknown config.data.dataset {data.dataset!r}; known datasets: "
                     f"{', '.join(DATASETS)}")
  if split not in shapes.SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {tuple(shapes.SPLITS)}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if data.batch_size % process_count:
    raise ValueError(f"config.data.batch_size {data.batch_size} (global rows per step) does "
                     f"not divide evenly over {process_count} processes")
  if data.documents_per_row < 1:
    raise ValueError(f"config.data.documents_per_row must be at least 1, got "
                     f"{data.documents_per_row}")
  documents_per_step = data.batch_size * data.documents_per_row
  if split == "train":
    indices = grain.MapDataset.range(data.train_documents).shuffle(seed=data.seed).repeat()
  else:
    indices = grain.MapDataset.range(data.held_out_documents)
  steps = indices.batch(documents_per_step, drop_remainder=False)
  steps = steps.map_with_index(_PackRows(config, split, process_index, process_count))
  return _Steps(steps, grain.ReadOptions(num_threads=num_threads,
                                         prefetch_buffer_size=prefetch))


__all__ = ["DATASETS", "image_slots_per_row", "make_dataset", "document_layout",
           "training_scene_batches"]
