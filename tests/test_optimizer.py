"""The release's optimizer: AdamW steps equal to torch's with the release's param groups, the
schedule equal to HF's, and the trainable set, groups and weight-decay mask of the real model."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util
from transformers.trainer_pt_utils import get_parameter_names

from configs import mmi_13b, tiny
from mmi_jax import trainable as trainable_lib
from mmi_jax.convert import release
from mmi_jax.models.mm_interleaved import frozen_param_patterns
from mmi_jax.param_names import release_name
from mmi_jax.train import optimizer
from release_shapes import SHAPES_13B

# The release's mm_pretrain.yaml (random_params_list, lr_for_random_params_list,
# wd_for_random_params_list) and HF TrainingArguments; written out here, not read from code.
RELEASE_GROUPS = (("llama_cross_attn.gate", 1e-4, 0.0), ("sampling_offsets", 1e-5, 0.0),
                  ("llama_cross_attn", 1e-4, None), ("image_decoder.decoder.unet", 1e-5, None))
RELEASE_LR, RELEASE_WD, BETAS, EPS, MAX_GRAD_NORM = 1e-4, 0.05, (0.9, 0.995), 1e-6, 1.0


def flat(tree):
  return traverse_util.flatten_dict(nn.meta.unbox(tree))


def joined(path):
  return "/".join(path)


@pytest.fixture(scope="module")
def config():
  return tiny.get_config()


@pytest.fixture(scope="module")
def abstract(config):
  return nn.meta.unbox(release.param_shapes(config.model))


@pytest.fixture(scope="module")
def decay_mask(config):
  return optimizer.release_weight_decay_mask(config.model)


# --------------------------------------------------------------------------------------------
# Fidelity: torch.optim.AdamW with the release's create_optimizer groups.


class ReleaseLlamaRMSNorm(torch.nn.Module):
  """Stands for the release's own `LlamaRMSNorm` class (modeling_llama_mmfs.py)."""


class ReleaseAdapterLayerNorm(torch.nn.Module):
  """Stands for the ViT-Adapter's own channels-first `LayerNorm` (adapter_modules.py)."""


class ReleaseModule(torch.nn.Module):
  """Any other release module that holds its own parameters (the MMFS attention, the model)."""


# Owner module (Flax path of the tiny model) -> the torch class of the release's module there.
OWNERS = {
    "": ReleaseModule,  # soi_token
    "mm_decoder/layers_0/llama_cross_attn": ReleaseModule,  # gate
    "mm_decoder/layers_0/llama_cross_attn/attn/sampling_offsets": lambda: torch.nn.Linear(1, 1),
    "mm_decoder/layers_0/llama_cross_attn/attn/value_proj": lambda: torch.nn.Linear(1, 1),
    "mm_decoder/layers_0/llama_cross_attn/norm1": ReleaseLlamaRMSNorm,
    "image_decoder/decoder/unet/conv_in": lambda: torch.nn.Conv2d(1, 1, 1),
    "image_decoder/decoder/unet/down_blocks_0/resnets_0/norm1": lambda: torch.nn.GroupNorm(1, 1),
    "image_decoder/decoder/unet/down_blocks_0/attentions_0/transformer_blocks_0/norm1":
        lambda: torch.nn.LayerNorm(1),
    "image_decoder/decoder/mmfs_module/mmfs_down_blocks_0/mmfs/sampling_offsets":
        lambda: torch.nn.Linear(1, 1),
    "visual_tokenizer/pos_ln": lambda: torch.nn.LayerNorm(1),
    "visual_tokenizer/encoder/adapter_spm/stem_1": ReleaseAdapterLayerNorm,
    "visual_tokenizer/encoder/adapter_interactions_0/injector/query_norm":
        lambda: torch.nn.LayerNorm(1),
    "visual_tokenizer/proj": lambda: torch.nn.Linear(1, 1),
}


def torch_model(tensors: dict[str, np.ndarray], owner_class: dict[str, object]
                ) -> torch.nn.Module:
  """A torch module tree holding `tensors` (by release name), each in a module of the class
  `owner_class` gives for its owner's name (`""`: the root); other modules are containers."""
  modules = {"": owner_class[""]()}
  for name in tensors:
    parts = name.split(".")[:-1]
    for depth in range(1, len(parts) + 1):
      prefix = ".".join(parts[:depth])
      if prefix not in modules:
        modules[prefix] = owner_class.get(prefix, torch.nn.Module)()
        modules[".".join(parts[:depth - 1])].add_module(parts[depth - 1], modules[prefix])
  for module in modules.values():
    module._parameters.clear()  # noqa: SLF001 (replaced by the tensors below)
  for name, value in tensors.items():
    owner, _, leaf = name.rpartition(".")
    modules[owner].register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(value.copy())))
  return modules[""]


def release_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
  """`LMMTrainer.create_optimizer` of the release, re-written from its code."""
  decay_parameters = get_parameter_names(model, [torch.nn.LayerNorm])  # ALL_LAYERNORM_LAYERS
  decay_parameters = [name for name in decay_parameters if "bias" not in name]
  groups = [dict(params=[], weight_decay=0.0), dict(params=[], weight_decay=RELEASE_WD)]
  for _, lr, wd in RELEASE_GROUPS:
    groups += [dict(params=[], lr=lr, weight_decay=0.0),
               dict(params=[], lr=lr, weight_decay=RELEASE_WD if wd is None else wd)]
  for name, param in model.named_parameters():
    index = next((i for i, (pattern, _, _) in enumerate(RELEASE_GROUPS) if pattern in name), -1)
    groups[(index + 1) * 2 + int(name in decay_parameters)]["params"].append(param)
  return torch.optim.AdamW(groups, lr=RELEASE_LR, betas=BETAS, eps=EPS,
                           weight_decay=RELEASE_WD)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_steps_match_torch_with_release_groups_schedule_and_clipping(
    config, abstract, decay_mask, dtype):
  config = config.copy_and_resolve_references()
  config.train.update(warmup_steps=3, steps=10)
  paths = [path for path in flat(abstract) if joined(path[:-1]) in OWNERS]
  assert len({joined(path[:-1]) for path in paths}) == len(OWNERS)
  names = {path: release_name(path) for path in paths}
  owner_class = {names[path].rpartition(".")[0]: OWNERS[joined(path[:-1])] for path in paths}
  rng = np.random.default_rng(0)
  shapes = {path: flat(abstract)[path].shape for path in paths}
  init = {path: rng.standard_normal(shapes[path]).astype(dtype) for path in paths}
  count = sum(math.prod(s) for s in shapes.values())
  # Gradient norms about these; above MAX_GRAD_NORM the gradients are clipped.
  norms = [0.3, 3.0, 0.5, 2.0, 0.8, 4.0, 0.2, 1.5]
  grads = [{path: (rng.standard_normal(shapes[path]) * n / math.sqrt(count)).astype(dtype)
            for path in paths} for n in norms]

  # torch: the release's groups, HF's cosine schedule, clip_grad_norm_ then AdamW.
  to_torch = release.to_release_layout
  model = torch_model({names[p]: to_torch(p, init[p]) for p in paths}, owner_class)
  torch_params = dict(model.named_parameters())
  assert sorted(torch_params) == sorted(names.values())
  opt = release_optimizer(model)
  schedule = transformers.get_cosine_schedule_with_warmup(opt, 3, 10)
  for grad in grads:
    for path in paths:
      torch_params[names[path]].grad = torch.from_numpy(to_torch(path, grad[path]).copy())
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    schedule.step()

  # optax: the same through mmi_jax's groups and decay mask of the real tiny model.
  with jax.enable_x64(dtype == "float64"):
    params = traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in init.items()})
    labels = optimizer.param_groups(params, config)
    tx = optimizer.make_optimizer(config, params, decay_mask, labels)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grad in grads:
      tree = traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in grad.items()})
      updates, state = update(tree, state, params)
      params = optax.apply_updates(params, updates)
    ours = {path: np.asarray(value) for path, value in flat(params).items()}

  for path in paths:
    theirs = torch_params[names[path]].detach().numpy()
    np.testing.assert_allclose(to_torch(path, ours[path]), theirs, rtol=1e-6, atol=1e-7,
                               err_msg=names[path])
    if dtype == "float64":
      # The change itself (1e-5 to 1e-4 per step, under float32's rounding of the params)
      # agrees to float64 precision, up to torch's +1e-6 on the norm when it clips.
      moved_ours = to_torch(path, ours[path] - init[path])
      moved_theirs = theirs - to_torch(path, init[path])
      np.testing.assert_allclose(moved_ours, moved_theirs, rtol=3e-6,
                                 atol=3e-6 * np.abs(moved_theirs).max(), err_msg=names[path])


@pytest.mark.parametrize("warmup, steps", [(3, 10), (1000, 15000), (0, 7)])
def test_schedule_is_hf_cosine_with_warmup(warmup, steps):
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
  hf = transformers.get_cosine_schedule_with_warmup(opt, warmup, steps).lr_lambdas[0]
  ours = optimizer.learning_rate_schedule(dict(warmup_steps=warmup, steps=steps))
  counts = np.unique(np.linspace(0, steps, 60).astype(int).tolist() + [warmup, warmup + 1])
  np.testing.assert_allclose([float(ours(c)) for c in counts], [hf(int(c)) for c in counts],
                             rtol=1e-6, atol=1e-7)
  assert float(ours(0)) == (0.0 if warmup else 1.0)


# --------------------------------------------------------------------------------------------
# The tiny model's real params.


def test_release_config_holds_the_release_recipe():
  train = mmi_13b.get_config().train
  assert tuple(tuple(g) for g in train.param_groups) == RELEASE_GROUPS
  assert (train.learning_rate, train.weight_decay, (train.adam_b1, train.adam_b2),
          train.adam_eps, train.max_grad_norm) == (RELEASE_LR, RELEASE_WD, BETAS, EPS,
                                                   MAX_GRAD_NORM)
  assert (train.warmup_steps, train.steps, train.unfreeze, train.freeze) == (1000, 15000, (), ())


def test_groups_of_tiny_model_and_their_learning_rates(config, abstract):
  labels = flat(optimizer.param_groups(abstract, config))
  offsets = [p for p in labels if "sampling_offsets" in p]
  assert {p[0] for p in offsets} == {"mm_decoder", "image_decoder", "visual_tokenizer"}
  assert any("mmfs_module" in p for p in offsets)  # the image decoder's MMFS net
  assert any("adapter_interactions_0" in p and "injector" in p for p in offsets)
  for path, label in labels.items():
    name = joined(path)
    if "llama_cross_attn/gate" in name:
      expected = "llama_cross_attn.gate"
    elif "sampling_offsets" in name:
      expected = "sampling_offsets"
    elif "llama_cross_attn" in name:
      expected = "llama_cross_attn"
    elif name.startswith("image_decoder/decoder/unet/"):
      expected = "image_decoder.decoder.unet"
    else:
      expected = optimizer.DEFAULT_GROUP
    assert label == expected, name

  warm, total = config.train.warmup_steps, config.train.steps
  rates = {step: optimizer.group_learning_rates(config, step) for step in (0, warm // 2, warm,
                                                                         (warm + total) // 2,
                                                                         total)}
  base = {"llama_cross_attn.gate": 1e-4, "sampling_offsets": 1e-5, "llama_cross_attn": 1e-4,
          "image_decoder.decoder.unet": 1e-5, optimizer.DEFAULT_GROUP: 1e-4}
  for step, multiplier in ((0, 0.0), (warm // 2, 0.5), (warm, 1.0), ((warm + total) // 2, 0.5),
                           (total, 0.0)):
    assert rates[step].keys() == base.keys()
    for label, lr in base.items():
      assert rates[step][label] == pytest.approx(lr * multiplier, rel=1e-6, abs=1e-12), step
  settings = optimizer.group_settings(config.train)
  assert settings["llama_cross_attn.gate"][1] == settings["sampling_offsets"][1] == 0.0
  assert settings["llama_cross_attn"][1] == settings["image_decoder.decoder.unet"][1] == 0.05


def test_weight_decay_mask_follows_torch_layer_norm_modules(decay_mask):
  mask = flat(decay_mask)
  expected = {
      # torch.nn.LayerNorm in the release: not decayed.
      "visual_tokenizer/encoder/adapter_interactions_0/injector/query_norm/scale": False,
      "visual_tokenizer/encoder/adapter_interactions_0/injector/feat_norm/scale": False,
      "visual_tokenizer/pos_ln/scale": False,
      "visual_tokenizer/post_ln/scale": False,
      "visual_tokenizer/perceiver_resampler/blip2qformer/encoder/layer_0/attention/attention/"
      "q_norm/scale": False,
      "image_decoder/decoder/unet/down_blocks_0/attentions_0/transformer_blocks_0/norm1/scale":
          False,
      # Other classes: decayed.
      "mm_decoder/layers_0/llama_cross_attn/norm1/scale": True,  # the release's LlamaRMSNorm
      "mm_decoder/layers_0/llama_cross_attn/norm2/scale": True,
      "visual_tokenizer/encoder/adapter_spm/stem_1/scale": True,  # the adapter's LayerNorm
      "image_decoder/decoder/unet/down_blocks_0/resnets_0/norm1/scale": True,  # GroupNorm
      "image_decoder/decoder/unet/conv_in/kernel": True,
      "mm_decoder/layers_0/llama_cross_attn/gate": True,  # its group's weight decay is 0
      "mm_decoder/layers_0/llama_cross_attn/attn/query_relpos": True,
      "soi_token": True,
  }
  for name, decays in expected.items():
    assert mask[tuple(name.split("/"))] is decays, name
  assert not any(mask[p] for p in mask if p[-1] == "bias")
  assert all(mask[p] for p in mask if p[-1] == "kernel")
  scales = [p for p in mask if p[-1] == "scale"]
  assert 0 < sum(mask[p] for p in scales) < len(scales)


def test_trainable_set_is_the_release_set_with_unfreeze_and_freeze(config, abstract):
  release_mask = trainable_lib.unfrozen_mask(abstract, frozen_param_patterns(config.model))
  mask = optimizer.trainable_mask(abstract, config)
  assert flat(mask) == flat(release_mask)
  assert trainable_lib.count_params(abstract, mask) == trainable_lib.count_params(
      abstract, release_mask)

  changed = config.copy_and_resolve_references()
  changed.train.unfreeze = (r"^mm_decoder/layers_1/",)
  changed.train.freeze = (r"^image_decoder/decoder/unet/",)
  mask = flat(optimizer.trainable_mask(abstract, changed))
  for path, trains in flat(release_mask).items():
    name = joined(path)
    if name.startswith("mm_decoder/layers_1/"):
      assert mask[path], name
    elif name.startswith("image_decoder/decoder/unet/"):
      assert not mask[path], name
    else:
      assert mask[path] == trains, name

  changed.train.freeze = (r"^image_decoder/decoder/unte/",)
  with pytest.raises(ValueError, match="unte"):
    optimizer.trainable_mask(abstract, changed)


def test_optimizer_state_holds_only_trainable_params(config, abstract, decay_mask):
  mask = optimizer.trainable_mask(abstract, config)
  trainable, frozen = trainable_lib.split_params(abstract, mask)
  assert flat(trainable_lib.merge_params(trainable, frozen)).keys() == flat(abstract).keys()
  selected = flat(mask)
  assert all(selected[path] for path in flat(trainable))
  assert not any(selected[path] for path in flat(frozen))

  tx = optimizer.make_optimizer(config, trainable, decay_mask)
  state = jax.eval_shape(tx.init, trainable)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  sizes = sum(math.prod(leaf.shape) for _, leaf in leaves)
  count = trainable_lib.count_params(abstract, mask)
  assert count == trainable_lib.count_params(trainable)
  assert 2 * count <= sizes <= 2 * count + 20  # Adam's mu and nu, plus step counters
  trainable_paths = set(flat(trainable))
  labels = optimizer.group_settings(config.train).keys()
  for key_path, leaf in leaves:
    keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
    assert keys[0] in labels  # multi_transform's state per group
    if len(keys) > 1:
      assert keys[1:] in trainable_paths, keys
    else:
      assert leaf.shape == (), keys  # a step counter


def test_param_group_pattern_that_matches_nothing_raises(config, abstract):
  changed = config.copy_and_resolve_references()
  changed.train.param_groups = tuple(changed.train.param_groups) + (("sampling_ofsets", 1.0,
                                                                    None),)
  with pytest.raises(ValueError, match="sampling_ofsets"):
    optimizer.param_groups(abstract, changed)
  # Without the check (groups emptied by freezing) its params simply do not exist.
  optimizer.param_groups(abstract, changed, check=False)


@pytest.mark.skipif(not SHAPES_13B.exists(), reason="shared/shapes_13b.json is not present")
def test_13b_trainable_set_and_group_sizes_match_the_release_state_dict():
  config = mmi_13b.get_config()
  abstract = nn.meta.unbox(release.param_shapes(config.model))
  entries = json.loads(SHAPES_13B.read_text())["state_dict"]
  mask = flat(optimizer.trainable_mask(abstract, config))
  labels = flat(optimizer.param_groups(abstract, config))
  shapes = flat(abstract)
  names = {path: release_name(path) for path in mask}
  assert {names[p]: trains for p, trains in mask.items()} == {
      name: entry["requires_grad"] for name, entry in entries.items()
      if entry["kind"] == "parameter"}
  # The release's groups: first substring match among the trainable state-dict names.
  expected, ours = {}, {}
  for name, entry in entries.items():
    if entry["kind"] == "parameter" and entry["requires_grad"]:
      group = next((p for p, _, _ in RELEASE_GROUPS if p in name), optimizer.DEFAULT_GROUP)
      expected[group] = expected.get(group, 0) + math.prod(entry["shape"])
  for path, label in labels.items():
    if mask[path]:
      ours[label] = ours.get(label, 0) + math.prod(shapes[path].shape)
  assert ours == expected
  assert sum(ours.values()) == 1_465_276_208  # SPEC 12

