"""The built-in shapes dataset: documents, pictures, tokenizer, packing and the grain pipeline."""

import dataclasses

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo, tiny
from mmi_jax import batch as batch_lib
from mmi_jax.data import packing, pipeline, shapes
from mmi_jax.data.tokenizer import shapes_tokenizer
from mmi_jax.models.multimodal_inputs import TokenIds


def _config(**data):
  config = tiny.get_config()  # encoder 56 px, decoder 64 px, 8 tokens per image
  config.model.tokens.update(text_vocab_size=64, vocab_size=66, pad_id=0, soi_id=64, image_id=65)
  config.data.update(dict(dict(sequence_length=128, batch_size=4, documents_per_row=2, seed=3,
                               train_documents=100, held_out_documents=10), **data))
  return config


def _assert_batches_equal(first, second):
  for name in ("text_ids", "attention_mask", "images", "decoder_images", "image_sequence_ids",
               "image_valid"):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)


def _foreground(image, scene):
  return np.any(image != np.asarray(shapes.BACKGROUNDS[scene.background], np.uint8), axis=-1)


def test_documents_are_deterministic_and_splits_differ():
  train = [shapes.make_document("train", index) for index in range(300)]
  assert train == [shapes.make_document("train", index) for index in range(300)]
  held_out = [shapes.make_document("held_out", index) for index in range(300)]
  assert not set(train) & set(held_out)
  assert not {d.scenes[0] for d in train} & {d.scenes[0] for d in held_out}
  assert shapes.make_document("train", 0, seed=1) != train[0]
  images = [len(document.scenes) for document in train]
  assert 0.45 < images.count(1) / len(images) < 0.75 and set(images) == {1, 2, 3}
  image_first = [isinstance(document.segments[0], shapes.Scene) for document in train]
  assert 0.35 < np.mean(image_first) < 0.65
  with pytest.raises(ValueError, match="unknown split 'test'"):
    shapes.make_document("test", 0)


def test_later_images_change_only_the_stated_attribute():
  tokenizer = shapes_tokenizer()
  multi = [d for d in map(lambda i: shapes.make_document("train", i), range(200))
           if len(d.scenes) > 1]
  assert {attribute for d in multi for attribute in d.changes} == set(shapes.ATTRIBUTES)
  for document in multi:
    sentences = [s for s in document.segments if isinstance(s, str)]
    assert len(sentences) == len(document.scenes) == len(document.changes) + 1
    image_first = isinstance(document.segments[0], shapes.Scene)
    assert all(isinstance(s, shapes.Scene) == (i % 2 == (0 if image_first else 1))
               for i, s in enumerate(document.segments))
    assert sentences[0] == shapes.caption_of(document.scenes[0])
    for before, after, attribute, sentence in zip(document.scenes, document.scenes[1:],
                                                  document.changes, sentences[1:]):
      assert getattr(before, attribute) != getattr(after, attribute)
      for other in set(shapes.ATTRIBUTES) - {attribute}:
        assert getattr(before, other) == getattr(after, other)
      assert getattr(after, attribute) in sentence.split()
      assert sentence.startswith("the same ") and tokenizer.unk_id not in tokenizer.encode(
          sentence)
      image = shapes.render(after, 56)
      assert shapes.classify_colour(image, after.background) == after.colour


@pytest.mark.parametrize("background", tuple(shapes.BACKGROUNDS))
def test_classify_colour_reads_the_rendered_colour(background):
  rng = np.random.default_rng(0)
  for colour in shapes.COLOURS:
    for shape in shapes.SHAPES:
      scene = shapes.Scene(shape, colour, background, centre=(0.3, 0.7), size=shapes.MIN_SIZE)
      image = shapes.render(scene, 56)
      assert shapes.classify_colour(image, background) == colour
      noisy = np.clip(image / 255 + rng.normal(0, 0.1, image.shape), 0, 1)
      assert shapes.classify_colour(noisy, background) == colour, (colour, shape)
  blank = np.full((56, 56, 3), shapes.BACKGROUNDS[background], np.uint8)
  assert shapes.classify_colour(blank, background) is None


def test_the_layout_settings_fix_size_and_centre_and_keep_the_documents():
  """`data.scene_sizes` / `data.scene_centred` (the demo's) fix the shapes' size and place;
  the documents still vary; impossible sizes are refused."""
  config = demo.get_config()
  layout = pipeline.document_layout(config.data)
  assert layout == {"sizes": (0.6, 0.6), "centred": True, "image_first_fraction": 0.4}
  placed = [shapes.make_document("train", index, **layout) for index in range(30)]
  assert len({document.text() for document in placed}) > 20
  for document in placed:
    for scene in document.scenes:
      assert scene.centre == (0.5, 0.5) and scene.size == 0.6
  assert len({scene.size for index in range(30)
              for scene in shapes.make_document("train", index).scenes}) > 20
  with pytest.raises(ValueError, match=r"shape sizes must be .* got \(0\.3, 0\.6\)"):
    shapes.make_document("train", 0, sizes=(0.3, 0.6))


def test_rendered_shapes_are_inside_and_large():
  scenes = [shapes.make_document("train", index).scenes[0] for index in range(100)]
  extreme = [shapes.Scene(shape, "red", "white", centre=(x, y), size=size)
             for shape in shapes.SHAPES for size in (shapes.MIN_SIZE, shapes.MAX_SIZE)
             for x in (size / 2 + shapes.MARGIN, 1 - size / 2 - shapes.MARGIN)
             for y in (size / 2 + shapes.MARGIN, 1 - size / 2 - shapes.MARGIN)]
  for scene in scenes + extreme:
    assert shapes.MIN_SIZE <= scene.size <= shapes.MAX_SIZE
    for size in (56, 64):
      image = shapes.render(scene, size)
      assert image.shape == (size, size, 3) and image.dtype == np.uint8
      foreground = _foreground(image, scene)
      edges = np.concatenate([foreground[0], foreground[-1], foreground[:, 0], foreground[:, -1]])
      assert not edges.any(), scene
      rows, columns = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
      assert columns[-1] - columns[0] + 1 >= 0.4 * size and rows[-1] - rows[0] + 1 >= 0.4 * size
      assert foreground.mean() >= 0.09
  np.testing.assert_array_equal(shapes.render(scenes[0], 56), shapes.render(scenes[0], 56))


def test_tokenizer_ids_and_round_trip():
  tokenizer = shapes_tokenizer(64)
  assert tokenizer.vocab_size == 4 + len(shapes.WORDS) <= 64
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.encode("a an the") == [4, 5, 6] and tokenizer.encode("zebra") == [3]
  assert tokenizer.encode("a red circle, now.") == tokenizer.encode("a red circle , now .")
  for index in range(50):
    for segment in shapes.make_document("held_out", index).segments:
      if isinstance(segment, str):
        ids = tokenizer.encode(segment)
        assert len(ids) == len(segment.split()) and min(ids) >= 4
        assert tokenizer.decode(ids) == segment
  assert tokenizer.decode([1, 4, 64, 65, 2, 0]) == "a"
  with pytest.raises(ValueError, match="more than text_vocab_size 16"):
    shapes_tokenizer(16)
  tokens = _config().model.tokens
  tokenizer.check_compatible(tokens)
  for name, value in (("soi_id", 10), ("pad_id", 3), ("bos_id", 5)):
    with pytest.raises(ValueError, match=name):
      tokenizer.check_compatible(_replaced(tokens, name, value))


def _replaced(tokens, name, value):
  tokens = tokens.copy_and_resolve_references()
  tokens[name] = value
  return tokens


def test_pack_rows_packs_several_documents_per_row_in_order():
  config = _config()
  tokenizer = shapes_tokenizer()
  tokens = TokenIds.from_config(config.model)
  documents = [shapes.make_document("train", index) for index in range(10)]
  batch, stats = packing.pack_rows(documents, rows=4, sequence_length=128, images_per_row=6,
                                   model_config=config.model, tokenizer=tokenizer)
  batch_lib.validate(batch, config.model)
  assert stats["packed"] == 10 and stats["skipped"] == 0 and stats["documents"] == 10
  assert batch.text_ids.shape == (4, 128) and batch.images.shape == (24, 56, 56, 3)
  assert batch.decoder_images.shape == (24, 64, 64, 3) and batch.context_starts is None
  assert batch.images.dtype == np.float32 and batch.image_valid.dtype == bool
  per_row = (batch.text_ids == tokens.bos).sum(1)
  assert per_row.sum() == 10 and per_row.max() >= 3

  # The rows hold the documents' tokens in order, right-padded; the slots their pictures.
  expected_ids, expected_images = [], []
  for document in documents:
    ids, images = packing.document_tokens(document, tokenizer, tokens)
    assert ids[0] == tokens.bos and ids[-1] == tokens.eos
    assert ids.count(tokens.image) == len(images) * tokens.tokens_per_image
    expected_ids += ids
    expected_images += images
  real = batch.attention_mask.astype(bool)
  np.testing.assert_array_equal(batch.text_ids[real], expected_ids)
  assert np.all(batch.text_ids[~real] == tokens.pad) and np.all(real[:, :-1] >= real[:, 1:])
  valid = np.flatnonzero(batch.image_valid)
  assert len(valid) == len(expected_images) == stats["images"]
  assert np.all(np.diff(batch.image_sequence_ids[valid]) >= 0)
  for slot, scene in zip(valid, expected_images):
    np.testing.assert_allclose(batch.images[slot] * 255, shapes.render(scene, 56), atol=1e-3)
    np.testing.assert_allclose(batch.decoder_images[slot] * 255, shapes.render(scene, 64),
                               atol=1e-3)
  padding = ~batch.image_valid
  assert np.all(batch.images[padding] == 0) and np.all(batch.image_sequence_ids[padding] == 0)


def test_pack_rows_skips_and_counts_documents_that_cannot_fit():
  config = _config()
  tokenizer = shapes_tokenizer()
  tokens = TokenIds.from_config(config.model)
  documents = [shapes.make_document("train", index) for index in range(40)]
  three = next(d for d in documents if len(d.scenes) == 3)
  single = next(d for d in documents if len(d.scenes) == 1)
  long_ids, _ = packing.document_tokens(three, tokenizer, tokens)
  single_ids, _ = packing.document_tokens(single, tokenizer, tokens)
  length = len(long_ids) - 1  # the three-image document is one token too long
  assert len(single_ids) * 2 <= length
  batch, stats = packing.pack_rows([three, single, single, single], rows=1,
                                   sequence_length=length, images_per_row=2,
                                   model_config=config.model, tokenizer=tokenizer)
  assert stats["skipped"] == 2 and stats["packed"] == 2
  assert stats["reasons"]["longer_than_row"] == 1 and stats["reasons"]["no_room"] == 1
  assert (batch.text_ids == tokens.bos).sum() == 2
  _, stats = packing.pack_rows([three], rows=1, sequence_length=128, images_per_row=2,
                               model_config=config.model, tokenizer=tokenizer)
  assert stats["reasons"]["too_many_images"] == 1 and stats["packed"] == 0
  _, stats = packing.pack_rows([three, single, single], rows=2, sequence_length=len(long_ids),
                               images_per_row=3, model_config=config.model, tokenizer=tokenizer,
                               documents_per_row=2)
  assert stats["reasons"]["row_full"] == 1 and stats["packed"] == 2


def test_dataset_elements_are_deterministic_and_restore_from_state():
  config = _config()
  dataset = pipeline.make_dataset(config, "train")
  batch, stats = dataset[2]
  assert batch.text_ids.shape == (4, 128) and batch.images.shape == (4 * 6, 56, 56, 3)
  assert stats["step"] == 2 and stats["documents"] == 8 and stats["skipped"] == 0
  assert ((batch.text_ids == 1).sum(1) == 2).all()
  batch_lib.validate(batch, config.model)
  _assert_batches_equal(batch, pipeline.make_dataset(config, "train")[2][0])

  iterator = iter(dataset)
  assert isinstance(iterator, grain.DatasetIterator)
  first = [next(iterator) for _ in range(3)]
  _assert_batches_equal(first[2][0], batch)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = iter(pipeline.make_dataset(config, "train"))
  restored.set_state(state)
  for (got, got_stats), (want, want_stats) in zip([next(restored) for _ in range(2)], expected):
    _assert_batches_equal(got, want)
    assert got_stats == want_stats
  assert not np.array_equal(expected[0][0].text_ids, expected[1][0].text_ids)


def test_orbax_checkpoint_manager_saves_the_iterator_state(tmp_path):
  config = _config()
  iterator = iter(pipeline.make_dataset(config, "train"))
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = next(iterator)
  restored = iter(pipeline.make_dataset(config, "train"))
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = next(restored)
  _assert_batches_equal(got[0], expected[0])
  assert got[1]["step"] == 3
  manager.close()


def test_process_shards_concatenate_to_the_global_batch():
  config = _config(batch_size=4, documents_per_row=3)
  whole, whole_stats = pipeline.make_dataset(config, "train")[1]
  for count in (2, 4):
    parts = [pipeline.make_dataset(config, "train", process_index=index, process_count=count)[1]
             for index in range(count)]
    assert parts[0][0].text_ids.shape == (4 // count, 128)
    for name in ("text_ids", "attention_mask", "images", "decoder_images", "image_sequence_ids",
                 "image_valid"):
      np.testing.assert_array_equal(
          np.concatenate([getattr(part, name) for part, _ in parts]), getattr(whole, name),
          err_msg=name)
    assert sum(stats["tokens"] for _, stats in parts) == whole_stats["tokens"]
  with pytest.raises(ValueError, match="does not divide evenly over 3 processes"):
    pipeline.make_dataset(config, "train", process_index=0, process_count=3)


def test_held_out_split_is_read_once_in_order():
  config = _config(batch_size=2, documents_per_row=2, held_out_documents=10)
  elements = list(pipeline.make_dataset(config, "held_out"))
  assert len(elements) == 3 and sum(stats["documents"] for _, stats in elements) == 10
  last, _ = elements[-1]
  assert last.text_ids.shape == (2, 128) and last.attention_mask[1].sum() == 0
  tokenizer = shapes_tokenizer()
  tokens = TokenIds.from_config(config.model)
  first_ids, _ = packing.document_tokens(shapes.make_document("held_out", 0, seed=3), tokenizer,
                                         tokens)
  np.testing.assert_array_equal(elements[0][0].text_ids[0, :len(first_ids)], first_ids)


def test_unknown_dataset_and_bad_configs_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown config.data.dataset 'mmc4'.*shapes"):
    pipeline.make_dataset(_config(dataset="mmc4"), "train")
  with pytest.raises(ValueError, match="unknown split"):
    pipeline.make_dataset(_config(), "validation")
  config = _config()
  config.model.tokens.update(soi_id=20)
  with pytest.raises(ValueError, match="soi_id 20"):
    pipeline.make_dataset(config, "train")
  assert pipeline.image_slots_per_row(_config(documents_per_row=20).data) == 30
  assert pipeline.image_slots_per_row(_config(documents_per_row=2).data) == 6
  replaced = dataclasses.replace(shapes.make_document("train", 0).scenes[0], colour="blue")
  assert shapes.caption_of(replaced).startswith("a blue ")


def test_image_first_fraction_changes_only_where_the_images_stand():
  """`data.image_first_fraction` sets how many documents put their images before their
  sentences; the scenes and sentences of every document stay the same."""

  def image_first(document):
    return isinstance(document.segments[0], shapes.Scene)

  for fraction in (0.0, 0.3, 1.0):
    documents = [shapes.make_document("train", index, image_first_fraction=fraction)
                 for index in range(400)]
    share = np.mean([image_first(document) for document in documents])
    assert abs(share - fraction) < 0.06, (fraction, share)
    for index in (0, 7, 99):
      default = shapes.make_document("train", index)
      assert documents[index].scenes == default.scenes
      assert (sorted(map(str, documents[index].segments))
              == sorted(map(str, default.segments)))
  with pytest.raises(ValueError, match="image_first_fraction"):
    shapes.make_document("train", 0, image_first_fraction=1.5)
