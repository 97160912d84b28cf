"""The LLM with MMFS (SPEC section 5) against an independent reference, cached decoding,
the release's shapes, and sharding."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from configs import mmi_13b, tiny
from mmi_jax import sharding
from mmi_jax.convert.torch_names import to_torch_layout
from mmi_jax.generate.decoding import decode_step, greedy_decode
from mmi_jax.models import multimodal_inputs as mm_inputs
from mmi_jax.models.multimodal_lm import MultimodalLM
from mmi_jax.models.text_head import TextHead, head_from_lm_head
from release_shapes import (SHAPES_13B, release_name_and_shape, release_shapes_of,
                            release_state_dict)
from torch_model_references import llama_reference, multimodal_lm_reference

CONFIG = tiny.get_config().model
TOKENS = mm_inputs.TokenIds.from_config(CONFIG)
T = CONFIG.tokens.tokens_per_image
D = CONFIG.llm.hidden_size
DV = CONFIG.vision_encoder.hidden_size
S = sum(s * s for s in CONFIG.llm.mmfs.scale_sizes)
MAX_IMAGES = 5  # static image slots per sequence (more than any row uses)
BOS, EOS, SOI, IMG, PAD = TOKENS.bos, TOKENS.eos, TOKENS.soi, TOKENS.image, TOKENS.pad


def _image(n_text_after=()):
  return [SOI] + [IMG] * T + list(n_text_after)


# Row 0 packs two documents and three images; row 1 is one document with one image.
ROW0 = ([BOS, 11, 12] + _image([13, 14]) + [EOS]
        + [BOS, 21] + _image([22, 23, 24]) + [25] + _image([26, 27]))
ROW1 = [BOS, 31, 32, 33] + _image([34, 35, 36])
IMAGES_PER_ROW = (3, 1)


@functools.lru_cache(maxsize=None)
def _module():
  return MultimodalLM.from_config(CONFIG)


@functools.lru_cache(maxsize=None)
def _params():
  """Random params with every part active: gates non-zero, offsets spread, norms off 1."""
  module = _module()
  abstract = nn.meta.unbox(sharding.abstract_params(
      module, jax.ShapeDtypeStruct((1, 4), jnp.int32), None,
      jax.ShapeDtypeStruct((1, 1, T, D), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, S, DV), jnp.float32)))
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(abstract)
  params = {}
  for path, leaf in flat.items():
    name = "/".join(path)
    if path[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    elif path[-1] == "gate":
      value = np.full(leaf.shape, 0.8)
    elif "sampling_offsets" in name and path[-1] == "bias":
      value = rng.uniform(-3, 3, leaf.shape)
    elif path[-1] == "embedding":
      value = rng.standard_normal(leaf.shape)
    else:
      value = 0.15 * rng.standard_normal(leaf.shape)
    params[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(params)


def _rows_to_batch(rows, length, left_pad=()):
  ids = np.full((len(rows), length), PAD, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    start = length - len(row) if r in left_pad else 0
    ids[r, start:start + len(row)] = row
    mask[r, start:start + len(row)] = 1
  return ids, mask


@functools.lru_cache(maxsize=None)
def _images(seed=1):
  """Flat per-image embeddings `[I, T, D]` and features `[I, S, DV]`, with sequence ids."""
  rng = np.random.default_rng(seed)
  count = sum(IMAGES_PER_ROW) + 1  # one extra, invalid entry
  embeds = rng.standard_normal((count, T, D)).astype(np.float32)
  features = rng.standard_normal((count, S, DV)).astype(np.float32)
  sequence_ids = np.array([0, 0, 1, 0, 1], np.int32)  # interleaved order in the flat list
  valid = np.array([1, 1, 1, 1, 0], bool)
  return embeds, features, sequence_ids, valid


def _per_sequence():
  embeds, features, sequence_ids, valid = _images()
  image_embeds, slot_mask = mm_inputs.images_per_sequence(
      jnp.asarray(embeds), jnp.asarray(sequence_ids), jnp.asarray(valid), 2, MAX_IMAGES)
  image_features, _ = mm_inputs.images_per_sequence(
      jnp.asarray(features), jnp.asarray(sequence_ids), jnp.asarray(valid), 2, MAX_IMAGES)
  return image_embeds, image_features, slot_mask


def _row_images(row):
  embeds, features, sequence_ids, valid = _images()
  keep = (sequence_ids == row) & valid
  return embeds[keep], features[keep]


# --------------------------------------------------------------------------------------------
# The independent reference: Hugging Face's Llama layers plus SPEC section 5 by hand.


def _torch_state(params):
  """The params as a release-named state dict of torch tensors."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  return {release_name_and_shape(path, v.shape)[0]: torch.from_numpy(
      np.array(to_torch_layout(path, v))) for path, v in flat.items()}


@functools.lru_cache(maxsize=None)
def _hf_decoder():
  state = _torch_state(_params())
  return llama_reference(CONFIG, state), state


def _reference_logits(row_ids, image_embeds, image_features):
  """SPEC section 5 for one sequence alone (a batch of one, as the release would run it)."""
  model, state = _hf_decoder()
  _, logits, image_mask = multimodal_lm_reference(model, state, CONFIG, row_ids, image_embeds,
                                                  image_features)
  return logits.numpy(), image_mask.numpy()


def _assert_close(actual, expected, rtol=1e-4):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@functools.lru_cache(maxsize=None)
def _forward():
  return jax.jit(lambda params, ids, mask, embeds, features, slots: _module().apply(
      {"params": params}, ids, mask, embeds, features, slots))


def test_mmfs_layers_equal_an_independent_reference_of_spec_5():
  ids, mask = _rows_to_batch([ROW0, ROW1], len(ROW0))
  image_embeds, image_features, slot_mask = _per_sequence()
  np.testing.assert_array_equal(slot_mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  out = _forward()(_params(), ids, mask, image_embeds, image_features, slot_mask)
  assert out["logits"].shape == (2, len(ROW0), CONFIG.tokens.vocab_size)
  for row, tokens in enumerate((ROW0, ROW1)):
    expected, image_mask = _reference_logits(tokens, *_row_images(row))
    if row == 0:  # the second document never sees the first document's image
      assert image_mask[:, 0].sum() > 0 and image_mask[len(ROW0) - 1].tolist() == [0, 1, 1]
    _assert_close(out["logits"][row, :len(tokens)], expected)
  # The synchronizer matters: without images the logits differ.
  plain = _module().apply({"params": _params()}, ids, mask, image_embeds)
  assert np.abs(np.asarray(plain["logits"] - out["logits"])).max() > 1e-2


def test_image_visibility_follows_the_nearest_bos_rule():
  ids = np.array([[BOS, SOI, IMG, IMG, 5, EOS, BOS, 6, SOI, IMG, IMG, 7]])
  valid = np.ones_like(ids)
  tokens = mm_inputs.TokenIds(tokens_per_image=2)
  state = mm_inputs.DocumentState.empty(1, 3)
  nearest_bos, positions, after = mm_inputs.scan_documents(ids, valid, 0, state, tokens)
  np.testing.assert_array_equal(nearest_bos[0], [0, 0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6])
  np.testing.assert_array_equal(after.image_starts[0], [2, 9, -1])
  visible = mm_inputs.image_visibility(nearest_bos, jnp.arange(12), after.image_starts)
  expected = np.zeros((12, 3), bool)
  expected[2:6, 0] = True  # from its first <|image|> token to the end of its document
  expected[9:, 1] = True
  np.testing.assert_array_equal(visible[0], expected)
  np.testing.assert_array_equal(positions[0], np.arange(12))


def test_check_image_layout_names_the_problem():
  ids, mask = _rows_to_batch([ROW0, ROW1], len(ROW0))
  mm_inputs.check_image_layout(ids, mask, IMAGES_PER_ROW, TOKENS, max_images=MAX_IMAGES)
  with pytest.raises(ValueError, match="row 1: 1 soi tokens but 2 images"):
    mm_inputs.check_image_layout(ids, mask, (3, 2), TOKENS)
  broken = ids.copy()
  broken[1, 6] = 40
  with pytest.raises(ValueError, match="row 1"):
    mm_inputs.check_image_layout(broken, mask, IMAGES_PER_ROW, TOKENS)


# --------------------------------------------------------------------------------------------
# Cached decoding.


def test_cached_greedy_decoding_equals_recomputing_the_full_forward():
  steps = 20
  prompt = [ROW0[:-3], ROW1]  # row 0 ends right after its third image
  length = max(len(r) for r in prompt)
  ids, mask = _rows_to_batch(prompt, length, left_pad=(1,))
  image_embeds, image_features, slot_mask = _per_sequence()
  tokens, logits = greedy_decode(_module(), _params(), ids, mask, image_embeds,
                                 image_features, slot_mask, steps=steps,
                                 max_length=length + steps)
  assert tokens.shape == (2, steps) and logits.shape == (2, steps, CONFIG.tokens.vocab_size)
  # Causal attention and causal visibility: one full forward over prompt + generated tokens
  # gives, at every position, what recomputing the full forward at that step gives.
  full_ids = np.concatenate([ids, np.asarray(tokens)], axis=1)
  full_mask = np.concatenate([mask, np.ones((2, steps), np.int32)], axis=1)
  full = _forward()(_params(), full_ids, full_mask, image_embeds, image_features, slot_mask)
  recomputed = np.asarray(full["logits"][:, length - 1:length - 1 + steps])
  _assert_close(logits, recomputed)
  np.testing.assert_array_equal(tokens, recomputed.argmax(-1))
  # The images are sampled while decoding: the same prompt without them decodes differently.
  plain = greedy_decode(_module(), _params(), ids, mask, image_embeds, None, slot_mask,
                        steps=steps, max_length=length + steps)[1]
  assert np.abs(np.asarray(plain - logits)).max() > 1e-2


def test_decoding_a_right_padded_row_equals_decoding_it_alone():
  steps = 6
  length = len(ROW0)
  ids, mask = _rows_to_batch([ROW0, ROW1], length)
  image_embeds, image_features, slot_mask = _per_sequence()
  tokens, logits = greedy_decode(_module(), _params(), ids, mask, image_embeds,
                                 image_features, slot_mask, steps=steps,
                                 max_length=length + steps)
  alone = greedy_decode(_module(), _params(), ids[1:, :len(ROW1)], mask[1:, :len(ROW1)],
                        image_embeds[1:], image_features[1:], slot_mask[1:], steps=steps,
                        max_length=len(ROW1) + steps)
  np.testing.assert_array_equal(tokens[1], alone[0][0])
  _assert_close(logits[1], alone[1][0])


def test_decoding_several_tokens_at_once_places_a_new_image():
  """Interleaved generation: a placeholder slot, the image set later, then a chunk holding
  soi + its tokens + text."""
  prompt = ROW0[:ROW0.index(SOI, 10)]  # row 0 up to its second image
  chunk = ROW0[len(prompt):len(prompt) + 1 + T + 2]
  image_embeds, image_features, _ = _per_sequence()
  image_embeds, image_features = image_embeds[:1], image_features[:1]
  slot_mask = jnp.asarray([[True, True, False, False, False]])
  module, params = _module(), _params()
  variables = {"params": params}
  placeholder = lambda x: x.at[:, 1].set(0.0)  # noqa: E731
  state = module.apply(variables, 1, len(prompt) + len(chunk), placeholder(image_embeds),
                       placeholder(image_features), slot_mask,
                       method=MultimodalLM.start_decoding)
  _, state = decode_step(module, params, jnp.asarray([prompt]), state)
  state = module.apply(variables, state, 1, image_embeds[:, 1], image_features[:, 1],
                       method=MultimodalLM.set_image)
  chunk_logits, state = decode_step(module, params, jnp.asarray([chunk]), state)
  full_ids, full_mask = _rows_to_batch([prompt + chunk], len(prompt) + len(chunk))
  full = _forward()(params, full_ids, full_mask, image_embeds, image_features, slot_mask)
  _assert_close(chunk_logits[0], full["logits"][0, len(prompt):])
  assert int(state.kv.length) == len(prompt) + len(chunk)
  assert int(state.documents.soi_count[0]) == 2


# --------------------------------------------------------------------------------------------
# Text head, release shapes, sharding.


def test_text_head_initialises_as_the_release():
  head = TextHead(vocab_size=10, text_vocab_size=8)
  hidden = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
  params = nn.meta.unbox(head.init(jax.random.key(0), hidden)["params"])
  logits = head.apply({"params": params}, hidden)
  np.testing.assert_allclose(logits[..., 8:], -5.0)  # 0 * h - 100 + 95
  lm_head = np.random.default_rng(1).standard_normal((16, 10)).astype(np.float32)
  initial = head_from_lm_head(lm_head, 10, 8)
  np.testing.assert_array_equal(initial["kernel"][:, :8], lm_head[:, :8])
  assert not np.any(initial["kernel"][:, 8:]) and list(initial["bias"][8:]) == [-100, -100]


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_config_has_exactly_the_release_shapes():
  config = mmi_13b.get_config().model
  module = MultimodalLM.from_config(config)
  positions = sum(s * s for s in config.llm.mmfs.scale_sizes)
  abstract = nn.meta.unbox(sharding.abstract_params(
      module, jax.ShapeDtypeStruct((1, 8), jnp.int32), None,
      jax.ShapeDtypeStruct((1, 2, config.tokens.tokens_per_image, config.llm.hidden_size),
                           jnp.float32),
      jax.ShapeDtypeStruct((1, 2, positions, config.vision_encoder.hidden_size), jnp.float32)))
  ours = release_shapes_of(abstract)
  release = {key: tuple(entry["shape"]) for key, entry in release_state_dict(
      ("mm_decoder", "text_decoder", "soi_token")).items()}
  assert ours == release
  total = sum(math.prod(s) for s in ours.values())
  assert total == 13_215_069_930 + 163_892_484 + 5_120  # SPEC 12: mm_decoder, head, soi


def test_sharded_forward_equals_the_unsharded_one():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  module, params = _module(), _params()
  ids, mask = _rows_to_batch([ROW0, ROW1, ROW1, ROW0], len(ROW0))
  image_embeds, image_features, slot_mask = _per_sequence()
  order = np.array([0, 1, 1, 0])
  inputs = (ids, mask, image_embeds[order], image_features[order], slot_mask[order])
  expected = _forward()(params, *inputs)["logits"]

  boxed = sharding.abstract_params(module, *(jax.ShapeDtypeStruct(x.shape, x.dtype)
                                             for x in inputs))
  shardings = sharding.param_shardings(boxed, mesh)
  placed = jax.device_put(params, shardings)
  assert sharding.shard_shapes(placed)["mm_decoder"]["layers_0"]["mlp"]["gate_proj"][
      "kernel"] == (D // 2, CONFIG.llm.mlp_dim // 2)
  batch_sharding = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with sharding.use_mesh(mesh):
    apply = jax.jit(lambda p, *x: module.apply({"params": p}, *x)["logits"],
                    in_shardings=(shardings,) + (batch_sharding,) * len(inputs),
                    out_shardings=batch_sharding)
    logits = apply(placed, *inputs)
  assert len(logits.sharding.device_set) == 8
  _assert_close(logits, expected, 1e-5)
