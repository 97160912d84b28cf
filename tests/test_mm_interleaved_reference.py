"""The assembled MMInterleaved forward against an independent PyTorch reference of the release.

Only the params are shared: the JAX params become a release-named state dict
(`convert.release.state_dict_items`) loaded into the torch references of the parts
(`torch_model_references`), and the wiring between the parts is written here in torch from
`mm_interleaved/models/mm_interleaved.py` (`_prepare_gt_text_ids`,
`_prepare_context_features_for_image_decoder`, `_prepare_mmfs_features_for_image_decoder`,
`forward`) and SPEC sections 2, 5, 7 and 8.

The batch (tiny config, float32, every param random so that gates, zero convs and `head_new`
matter): row 0 packs two documents with images A | B, C; row 1 is one document whose image D
follows `<s>` directly (context `[<s>, soi]`, no image loss). The flat image list interleaves
the rows and holds a padding slot of row 0 before B: `[A, padding, D, B, C]`. B's previous
image in its row is A, in the other document, so B has no MMFS-net value source; C's is B.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import tiny
from mmi_jax import sharding
from mmi_jax.batch import example_batch, validate
from mmi_jax.convert import release
from mmi_jax.models.batch import Batch
from mmi_jax.models.image_decoder import ImageDecoderConfig
from mmi_jax.models.mm_interleaved import DiffusionInputs, MMInterleaved, text_targets
from mmi_jax.models.multimodal_inputs import TokenIds
import torch_model_references as model_ref
from random_params import random_params

CONFIG = tiny.get_config().model
TOKENS = CONFIG.tokens
BOS, EOS, PAD = TOKENS.bos_id, TOKENS.eos_id, TOKENS.pad_id
SOI, IMG = TOKENS.soi_id, TOKENS.image_id
IGNORE = -100
RTOL = 1e-4  # model against reference
DISTINCT = 1e-3  # a wiring alternative differs by more than this (relative): 10x RTOL


def _image():
  return [SOI] + [IMG] * TOKENS.tokens_per_image


ROWS = ([BOS, 11, 12] + _image() + [13, EOS]             # document 1: image A
        + [BOS, 21, 22] + _image() + [23] + _image() + [24, EOS],  # document 2: B, C
        [BOS] + _image() + [31, 32, 33, EOS])             # image D right after <s>
LENGTH = 40
SLOT_ROWS = np.array([0, 0, 1, 0, 0], np.int32)  # A, padding, D, B, C
SLOT_VALID = np.array([True, False, True, True, True])
SLOT_A, SLOT_PAD, SLOT_D, SLOT_B, SLOT_C = range(5)
PROMPT_OFFSETS = np.array([0, 11], np.int32)
IGNORE_NOIMAGE_TEXT = np.array([True, False])


# --------------------------------------------------------------------------------------------
# The release's wiring, in torch.


def prepare_gt_text_ids(text_ids, attention_mask, ignore_prompt_token_offset=0,
                        ignore_noimage_cond_loss=False):
  """`MMInterleaved._prepare_gt_text_ids` of the release (no `gt_text_ids` given); the
  dataset-name test is the flag `ignore_noimage_cond_loss`. `[B, L] -> [B, L - 1]`."""
  gt_text_ids = text_ids.clone()
  if isinstance(ignore_prompt_token_offset, int):
    gt_text_ids[:, :ignore_prompt_token_offset] = IGNORE
  else:
    for idx, offset in enumerate(ignore_prompt_token_offset):
      gt_text_ids[idx, :offset] = IGNORE
  if ignore_noimage_cond_loss:
    text_pos_idxs = torch.arange(text_ids.shape[-1])[None, :].repeat(text_ids.shape[0], 1)
    nearest_bos_idxs = text_pos_idxs.masked_fill(text_ids != BOS, -1).cummax(dim=1).values
    nearest_bos_idxs = torch.clamp(nearest_bos_idxs, min=0)
    nearest_soi_idxs = text_pos_idxs.masked_fill(text_ids != SOI, -1).cummax(dim=1).values
    noimage_cond_token = torch.logical_or(nearest_soi_idxs < nearest_bos_idxs,
                                          nearest_soi_idxs == -1)
    gt_text_ids = gt_text_ids.masked_fill(noimage_cond_token, IGNORE)
  gt_text_ids = gt_text_ids[:, 1:]
  gt_text_ids = gt_text_ids.masked_fill(text_ids[:, 1:] == PAD, IGNORE)
  gt_text_ids = gt_text_ids.masked_fill(text_ids[:, 1:] == IMG, IGNORE)
  gt_text_ids = gt_text_ids.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
  is_bos2soi_token = torch.logical_and(text_ids[:, :-1] == BOS, text_ids[:, 1:] == SOI)
  gt_text_ids = gt_text_ids.masked_fill(is_bos2soi_token, IGNORE)
  return gt_text_ids.masked_fill(text_ids[:, 1:] == BOS, IGNORE)


def gt_text_ids_per_row(text_ids, attention_mask, prompt_offsets=None, ignore_noimage=None):
  """`prepare_gt_text_ids` of each row alone (the release decides both options per batch)."""
  rows = []
  for row in range(text_ids.shape[0]):
    offset = 0 if prompt_offsets is None else int(prompt_offsets[row])
    flag = False if ignore_noimage is None else bool(ignore_noimage[row])
    rows.append(prepare_gt_text_ids(torch.as_tensor(text_ids[row:row + 1]).long(),
                                    torch.as_tensor(attention_mask[row:row + 1]), offset, flag))
  return torch.cat(rows)


def sincos_1d_table(dim, length):
  """MAE's `get_1d_sincos_pos_embed_from_grid(dim, arange(length))` in float32:
  `[sin(p w_k), cos(p w_k)]`, `w_k = 1 / 10000^(2k / dim)`."""
  omega = np.arange(dim // 2, dtype=np.float32)
  omega /= dim / 2.0
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", np.arange(length, dtype=np.float32), omega)
  return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))


def document_starts(text_ids):
  """Each image's `nearest_bos_idxs` as the release's MMC4 pipeline computes them
  (`calc_nearest_bos_token_idxs`): the last `<s>` before its soi, else 0. Images in row-major
  soi order."""
  starts = []
  for row, position in zip(*np.nonzero(text_ids == SOI)):
    before = np.flatnonzero(text_ids[row, :position] == BOS)
    starts.append(int(before[-1]) if before.size else 0)
  return torch.tensor(starts)


def context_features(hidden, text_ids, nearest_bos_idxs, state, seq_len):
  """`_prepare_context_features_for_image_decoder`: `[B_I, L_max, D]` and mask `[B_I, L_max]`."""
  rows, soi_positions = (torch.as_tensor(text_ids) == SOI).nonzero(as_tuple=True)
  lengths = soi_positions - nearest_bos_idxs + 1
  length_max, width = int(lengths.max()), hidden.shape[-1]
  features = torch.zeros(len(rows), length_max, width)
  mask = torch.zeros(len(rows), length_max, dtype=torch.long)
  for i in range(len(rows)):
    features[i, :lengths[i]] = hidden[rows[i], nearest_bos_idxs[i]:soi_positions[i] + 1].flip(0)
    mask[i, :lengths[i]] = 1
  features = F.linear(features, state["context_feat_proj.weight"], state["context_feat_proj.bias"])
  return features + sincos_1d_table(width, seq_len)[None, :length_max], mask


def mmfs_features_for_image_decoder(features, text_ids, nearest_bos_idxs):
  """`_prepare_mmfs_features_for_image_decoder`: the previous image of each image (flat
  row-major order) when its soi lies at or after the image's `<s>`; `[B_I, 1, S, C]` and mask
  `[B_I, 1]`."""
  length = text_ids.shape[1]
  rows, positions = (torch.as_tensor(text_ids) == SOI).nonzero(as_tuple=True)
  image_start_token_idx = rows * length + positions
  nearest_bos_idxs = rows * length + nearest_bos_idxs
  image_context_mask = nearest_bos_idxs[:, None] <= image_start_token_idx[None, :]
  image_context_mask = torch.tril(image_context_mask, diagonal=-1)
  image_context_mask = torch.triu(image_context_mask, diagonal=-1)
  mmfs_features = torch.zeros_like(features)[:, None]
  mmfs_mask = torch.zeros((len(rows), 1), dtype=torch.long)
  for i in range(len(rows)):
    idxs = image_context_mask[i].nonzero(as_tuple=True)[-1]
    mmfs_features[i, :len(idxs)] = features[idxs]
    mmfs_mask[i, :len(idxs)] = 1
  return mmfs_features, mmfs_mask


def flatten_maps(maps, sizes=None):
  """NCHW maps (finest first) -> `[N, sum(h * w), C]`, keeping those of a side in `sizes`
  (the release's `"b n c h w -> b n (h w) c"` and concatenation)."""
  return torch.cat([m.flatten(2).transpose(1, 2) for m in maps
                    if sizes is None or m.shape[-1] in sizes], dim=1)


def _sub_state(state, prefix):
  return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _load(module, state, missing_ok=None, unexpected_ok=None):
  """Loads `state` into `module`; keys it lacks or does not use must match the regular
  expressions `missing_ok` / `unexpected_ok`."""
  missing, unexpected = module.load_state_dict(state, strict=False)
  assert all(missing_ok and re.search(missing_ok, k) for k in missing), missing
  assert all(unexpected_ok and re.search(unexpected_ok, k) for k in unexpected), unexpected
  return module


def reference_forward(state, text_ids, attention_mask, images, decoder_images, sequence_ids,
                      order, diffusion, prompt_offsets, ignore_noimage, extra_cases=None):
  """The release's `MMInterleaved.forward` on the images `order` (row-major), as torch.

  Args:
    state: the release state dict (torch tensors).
    images, decoder_images, sequence_ids: `[N, H, W, 3]` image slots and their rows; `order`
      picks the real ones in the release's order. diffusion: the `DiffusionInputs` arrays of
      the slots.
    extra_cases: optional `(state, intermediates) -> cases`, each case `(name, image slot,
      context [Lc, D], mmfs_features [1, S, C], mmfs_mask [1])`: more decoder inputs whose
      per-image loss is reported under `out["extra"][name]` (for wiring checks).
  Returns:
    A dict of torch tensors and intermediates.
  """
  out = {}
  # Visual tokenizer.
  tokenizer = _load(model_ref.visual_tokenizer_reference(CONFIG),
                    _sub_state(state, "visual_tokenizer."),
                    unexpected_ok=r"embeddings\.position_ids$")  # not persistent here
  nchw = lambda x: torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)  # noqa: E731
  with torch.no_grad():
    vis_embed, _, maps = tokenizer(nchw(images[order]))
  llm_features = flatten_maps(maps, tuple(CONFIG.llm.mmfs.scale_sizes))
  decoder_features = flatten_maps(maps)
  out.update(vis_embed=vis_embed, maps=maps)

  # The LLM, one row at a time (right padding changes nothing for the real tokens).
  llama = model_ref.llama_reference(CONFIG, state)
  batch, length = text_ids.shape
  hidden = torch.zeros(batch, length, CONFIG.llm.hidden_size)
  logits = torch.zeros(batch, length, TOKENS.vocab_size)
  row_of_image = np.asarray(sequence_ids)[order]
  for row in range(batch):
    real = int(attention_mask[row].sum())
    mine = np.flatnonzero(row_of_image == row)
    hidden[row, :real], logits[row, :real], _ = model_ref.multimodal_lm_reference(
        llama, state, CONFIG, text_ids[row, :real].tolist(), vis_embed[mine],
        llm_features[mine])
  out.update(hidden=hidden, logits=logits)

  gt_text_ids = gt_text_ids_per_row(text_ids, attention_mask, prompt_offsets, ignore_noimage)
  loss_txt = F.cross_entropy(logits.transpose(1, 2)[..., :-1], gt_text_ids, ignore_index=IGNORE,
                             reduction="mean")
  out.update(gt_text_ids=gt_text_ids, loss_txt=loss_txt)

  # The image decoder.
  nearest_bos_idxs = document_starts(text_ids)
  context, context_mask = context_features(hidden, text_ids, nearest_bos_idxs, state,
                                           CONFIG.image_decoder.context_pos_length)
  mmfs_features, mmfs_mask = mmfs_features_for_image_decoder(decoder_features, text_ids,
                                                             nearest_bos_idxs)
  out.update(context=context, context_mask=context_mask, mmfs_mask=mmfs_mask,
             decoder_features=decoder_features)
  extra_cases = () if extra_cases is None else extra_cases(state, out)
  names = [name for name, *_ in extra_cases]
  extra_length = max([len(c[2]) for c in extra_cases], default=0)
  width = max(context.shape[1], extra_length)
  pad = lambda x, n: F.pad(x, (0, 0) * (x.ndim - 2) + (0, n - x.shape[1]))  # noqa: E731
  context, context_mask = pad(context, width), pad(context_mask, width)
  extra_contexts = [pad(torch.as_tensor(c[2])[None], width) for c in extra_cases]
  slots = list(order) + [c[1] for c in extra_cases]
  decoder_inputs = dict(
      images=torch.from_numpy(np.asarray(decoder_images)[slots]),
      context=torch.cat([context] + extra_contexts),
      context_mask=torch.cat([context_mask] + [pad(torch.ones(1, len(c[2]), dtype=torch.long),
                                                  width) for c in extra_cases]),
      mmfs_features=torch.cat([mmfs_features] + [torch.as_tensor(c[3])[None]
                                                 for c in extra_cases]),
      mmfs_mask=torch.cat([mmfs_mask] + [torch.as_tensor(c[4])[None] for c in extra_cases]),
      **{k: torch.from_numpy(np.asarray(getattr(diffusion, k))[slots])
         for k in ("latent_noise", "noise", "timesteps", "uncond_mask")})
  decoder_config = ImageDecoderConfig.from_config(CONFIG)
  unet, vae, qformer = model_ref.image_decoder_modules(decoder_config, CONFIG.llm.hidden_size)
  _load(unet, _sub_state(state, "image_decoder.decoder.unet."))
  _load(vae, _sub_state(state, "image_decoder.decoder.vae."))
  _load(qformer, _sub_state(state, "image_decoder.perceiver_resampler.blip2qformer."),
        missing_ok=r"layer\.\d+\.(intermediate|output)\.")  # text path, unused by queries
  mmfs = "image_decoder.decoder.mmfs_module."
  per_image = model_ref.image_decoder_loss_reference(
      decoder_config, unet, vae, qformer, state["image_decoder.perceiver_resampler.queries"],
      state["image_decoder.neg_prompt_embeds"],
      [_sub_state(state, f"{mmfs}mmfs_down_blocks.{i}.")
       for i in range(len(decoder_config.mmfs.base_spatial_shapes))],
      _sub_state(state, f"{mmfs}mmfs_mid_block."), decoder_inputs)
  count = len(order)
  per_image, extra = per_image[:count], per_image[count:]
  # ImageDecoder.forward: (squared error * is_cond_image).mean() over all elements; every
  # image has as many elements, so this is the mean of the masked per-image means.
  is_cond_image = (decoder_inputs["context_mask"][:count].sum(dim=1) > 2).float()
  loss_img = (per_image * is_cond_image).mean()
  loss = CONFIG.loss.text_weight * loss_txt + CONFIG.loss.image_weight * loss_img
  out.update(per_image_loss=per_image, is_cond_image=is_cond_image, loss_img=loss_img, loss=loss,
             extra=dict(zip(names, extra)))
  return out


# --------------------------------------------------------------------------------------------
# The JAX side.


def active_params(abstract, seed=0):
  """`random_params` (every param non-zero: zero convs, `head_new`, ...) with the MMFS layers
  fully at work: gates at 0.8 (tanh 0.66) and sampling offsets spread over +-2 pixels."""
  rng = np.random.default_rng(seed + 1)

  def activate(path, value):
    names = [entry.key for entry in path]
    if names[-1] == "gate":
      return np.full_like(value, 0.8)
    if names[-2:] == ["sampling_offsets", "bias"]:
      return rng.uniform(-2.0, 2.0, value.shape).astype(value.dtype)
    return value

  return jax.tree_util.tree_map_with_path(activate, random_params(abstract, seed))


def make_batch(seed=1):
  text_ids = np.full((len(ROWS), LENGTH), PAD, np.int32)
  attention_mask = np.zeros((len(ROWS), LENGTH), np.int32)
  for row, tokens in enumerate(ROWS):
    text_ids[row, :len(tokens)] = tokens
    attention_mask[row, :len(tokens)] = 1
  rng = np.random.default_rng(seed)
  slots = len(SLOT_ROWS)
  size, decoder_size = CONFIG.vision_encoder.image_size, CONFIG.image_decoder.image_size
  batch = Batch(
      text_ids=text_ids, attention_mask=attention_mask,
      images=rng.uniform(size=(slots, size, size, 3)).astype(np.float32),
      image_sequence_ids=SLOT_ROWS, image_valid=SLOT_VALID,
      decoder_images=rng.uniform(size=(slots, decoder_size, decoder_size, 3)).astype(np.float32),
      prompt_offsets=PROMPT_OFFSETS, ignore_noimage_text=IGNORE_NOIMAGE_TEXT)
  latent = ImageDecoderConfig.from_config(CONFIG).latent_size
  latent_shape = (slots, latent, latent, CONFIG.image_decoder.vae.latent_channels)
  diffusion = DiffusionInputs(
      latent_noise=rng.standard_normal(latent_shape).astype(np.float32),
      noise=rng.standard_normal(latent_shape).astype(np.float32),
      timesteps=np.array([10, 999, 500, 123, 250], np.int32),
      uncond_mask=np.zeros(slots, bool))
  return batch, diffusion


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _wiring_alternatives(state, intermediates):
  """Decoder inputs the model must NOT compute: B with its previous image A (other document)
  as MMFS source; C without its source B; B with a context from the row's start (across the
  document boundary)."""
  hidden, features = intermediates["hidden"], intermediates["decoder_features"]
  context, lengths = intermediates["context"], intermediates["context_mask"].sum(1)
  soi_b = ROWS[0].index(SOI, ROWS[0].index(BOS, 1))
  row_start_context = F.linear(hidden[0, :soi_b + 1].flip(0), state["context_feat_proj.weight"],
                               state["context_feat_proj.bias"]) + sincos_1d_table(
                                   CONFIG.llm.hidden_size, soi_b + 1)
  yes, no = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
  return (("B sourcing A", SLOT_B, context[1, :lengths[1]], features[0:1], yes),
          ("C without source", SLOT_C, context[2, :lengths[2]], features[1:2], no),
          ("B with row-start context", SLOT_B, row_start_context, features[0:1], no))


@pytest.fixture(scope="module")
def case():
  model = MMInterleaved.from_config(CONFIG)
  params = active_params(sharding.abstract_params(model, example_batch(CONFIG)))
  batch, diffusion = make_batch()
  validate(batch, CONFIG)
  forward = jax.jit(lambda p, b, d: model.apply({"params": p}, b, diffusion=d))
  out = jax.tree.map(np.asarray, forward(params, batch, diffusion))

  state = {key: torch.from_numpy(np.array(value))
           for key, value in release.state_dict_items(params, CONFIG)}
  order = np.array([SLOT_A, SLOT_B, SLOT_C, SLOT_D])  # the release's order: row-major
  reference = reference_forward(state, batch.text_ids, batch.attention_mask, batch.images,
                                batch.decoder_images, SLOT_ROWS, order, diffusion,
                                PROMPT_OFFSETS, IGNORE_NOIMAGE_TEXT, _wiring_alternatives)
  return dict(out=out, reference=reference, wiring=reference["extra"], order=order)


# --------------------------------------------------------------------------------------------
# 1. The whole forward.


def test_forward_equals_the_release_reference(case):
  out, ref, order = case["out"], case["reference"], case["order"]
  for row, tokens in enumerate(ROWS):
    error = _relative_error(out["logits"][row, :len(tokens)], ref["logits"][row, :len(tokens)])
    assert error <= RTOL, (row, error)
  np.testing.assert_array_equal(out["text_targets"], ref["gt_text_ids"].numpy())
  assert int(out["num_text_targets"]) == int((ref["gt_text_ids"] != IGNORE).sum())
  np.testing.assert_allclose(out["loss_txt"], float(ref["loss_txt"]), rtol=RTOL)
  np.testing.assert_allclose(out["per_image_loss"][order], ref["per_image_loss"].numpy(),
                             rtol=RTOL)
  np.testing.assert_allclose(out["loss_img"], float(ref["loss_img"]), rtol=RTOL)
  np.testing.assert_allclose(out["loss"], float(ref["loss"]), rtol=RTOL)
  # The image weights: D has only [<s>, soi] as context; the padding slot never counts.
  np.testing.assert_array_equal(ref["is_cond_image"].numpy(), [1, 1, 1, 0])
  np.testing.assert_array_equal(out["image_loss_weight"][order], [1, 1, 1, 0])
  assert out["image_loss_weight"][SLOT_PAD] == 0
  # Both losses take part: neither is negligible in the total.
  assert float(ref["loss_txt"]) > 0.1 and float(ref["loss_img"]) > 0.01


# --------------------------------------------------------------------------------------------
# 2. The text-loss rules.


def _rule_rows():
  """Rows for every rule of `_prepare_gt_text_ids`: text before any `<s>`, a pad token inside
  the text, a non-pad token under attention mask 0, `<s>` then soi, packed documents with and
  without images."""
  image = [SOI, IMG, IMG]
  rows = [
      [BOS, 5, 6] + image + [7, PAD, 8, EOS, BOS, 9, 10, EOS, BOS] + image + [11, 12],
      [5, 6, 7, BOS, 8] + image + [9, EOS, BOS, 13, 14] + image + [15, EOS],
      [BOS] + image + [16, 17, EOS, BOS, 18, SOI, IMG, IMG, 19, 20, 21],
  ]
  length = max(len(r) for r in rows) + 2
  ids = np.full((len(rows), length), PAD, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    ids[r, :len(row)], mask[r, :len(row)] = row, 1
  ids[2, len(rows[2])] = 22  # a real token id, but attention mask 0
  return ids, mask


@pytest.mark.parametrize("prompt_offsets, ignore_noimage", [
    (None, None),
    (np.array([4, 0, 9]), None),
    (None, np.array([True, False, True])),
    (np.array([0, 6, 2]), np.array([True, True, False])),
], ids=["plain", "prompt-offsets", "ignore-noimage-text", "both"])
def test_text_targets_follow_the_release_rules(prompt_offsets, ignore_noimage):
  ids, mask = _rule_rows()
  tokens = TokenIds.from_config(CONFIG)
  ours = text_targets(jnp.asarray(ids), jnp.asarray(mask), tokens,
                      None if prompt_offsets is None else jnp.asarray(prompt_offsets),
                      None if ignore_noimage is None else jnp.asarray(ignore_noimage))
  expected = gt_text_ids_per_row(ids, mask, prompt_offsets, ignore_noimage).numpy()
  np.testing.assert_array_equal(np.asarray(ours), expected)
  plain = gt_text_ids_per_row(ids, mask).numpy()
  if prompt_offsets is not None or ignore_noimage is not None:  # the options do change targets
    assert np.sum(expected != IGNORE) < np.sum(plain != IGNORE)
  assert (expected == SOI).any()  # soi stays a target (except right after <s>)


# --------------------------------------------------------------------------------------------
# 3. The wiring between the parts.


def test_mmfs_net_sources_only_the_previous_image_of_the_same_document(case):
  """B's previous image in its row is A of the other document: B gets no MMFS-net value source
  (the release's `_prepare_mmfs_features_for_image_decoder`); C gets B. Computing B with A as
  its source, or C without B, gives clearly different losses."""
  out, ref, wiring = case["out"], case["reference"], case["wiring"]
  np.testing.assert_array_equal(ref["mmfs_mask"].numpy()[:, 0], [0, 0, 1, 0])  # A, B, C, D
  ours_b, ours_c = float(out["per_image_loss"][SLOT_B]), float(out["per_image_loss"][SLOT_C])
  np.testing.assert_allclose(ours_b, float(ref["per_image_loss"][1]), rtol=RTOL)
  np.testing.assert_allclose(ours_c, float(ref["per_image_loss"][2]), rtol=RTOL)
  assert abs(ours_b - float(wiring["B sourcing A"])) > DISTINCT * ours_b
  assert abs(ours_c - float(wiring["C without source"])) > DISTINCT * ours_c


def test_contexts_start_at_the_document_start(case):
  """B's context runs from its document's `<s>`, not from the row's start."""
  out, ref, wiring = case["out"], case["reference"], case["wiring"]
  np.testing.assert_array_equal(ref["context_mask"].sum(1).numpy(), [4, 4, 14, 2])  # A B C D
  ours_b = float(out["per_image_loss"][SLOT_B])
  assert abs(ours_b - float(wiring["B with row-start context"])) > DISTINCT * ours_b
