"""The release's optimizer in optax: trainable set, learning-rate groups, AdamW (SPEC 9).

Mirrors `LMMTrainer.create_optimizer` of the release (`mm_interleaved/engine/lmm_trainer.py`,
HF Trainer 4.31, `mm_pretrain.yaml`, DeepSpeed ZeRO-1 with `gradient_clipping: auto`):

  * only trainable params are optimized (`trainable_mask`: the release's frozen set, SPEC 9,
    with `config.train.unfreeze` / `freeze` applied); the train step differentiates only
    w.r.t. them (`mmi_jax.trainable.split_params` / `merge_params`), so frozen params
    have no optimizer state;
  * groups (`param_groups`): the first `config.train.param_groups` pattern that is a substring
    of the param's release state-dict name (`mmi_jax.param_names.release_name`) picks the group's
    learning rate and weight decay (None: the default); unmatched params use the defaults;
  * inside every group, biases (names containing "bias") and params of modules that mirror
    `torch.nn.LayerNorm` get no weight decay (HF Trainer's `get_parameter_names(model,
    ALL_LAYERNORM_LAYERS)`): `weight_decay_mask`, read off the modules that own the params.
    The Llama RMSNorms, the ViT-Adapter's channels-first LayerNorm and GroupNorms are other
    classes in the release, so they are decayed;
  * the global gradient norm over all trainable grads is clipped to `max_grad_norm`, then
    AdamW (torch.optim.AdamW: decoupled decay `p -= lr * wd * p`) steps each group with its
    own lr times HF's `get_cosine_schedule_with_warmup` multiplier (`learning_rate_schedule`).

Gradient accumulation (the average of micro-batch gradients) belongs to the train step.

  params = ...                                   # the whole model's params
  mask = trainable_mask(params, config)
  trainable, frozen = trainable_lib.split_params(params, mask)
  decay = release_weight_decay_mask(config.model)
  tx = make_optimizer(config, trainable, decay)
  state = tx.init(trainable)
  updates, state = tx.update(grads, state, trainable)   # grads: like `trainable`
  trainable = optax.apply_updates(trainable, updates)
  params = trainable_lib.merge_params(trainable, frozen)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import optax
from flax import traverse_util

from mmi_jax import trainable as trainable_lib
from mmi_jax.batch import example_batch
from mmi_jax.command_line import UsageError
from mmi_jax.models.mm_interleaved import MMInterleaved, frozen_param_patterns
from mmi_jax.models.norms import ChannelsFirstLayerNorm
from mmi_jax.param_names import release_name

DEFAULT_GROUP = "default"  # label of the params no `param_groups` pattern matches
Path = tuple[str, ...]


def _flat(tree: Any) -> dict[Path, Any]:
  return traverse_util.flatten_dict(nn.meta.unbox(tree))


def _compile_all(patterns: Sequence[str], paths: Sequence[str], what: str) -> list[re.Pattern]:
  compiled = [re.compile(p) for p in patterns]
  for pattern in compiled:
    if not any(pattern.search(path) for path in paths):
      raise UsageError(f"{what} pattern {pattern.pattern!r} matches no param path "
                       f"(paths look like {paths[0]!r})")
  return compiled


def trainable_mask(params: Any, config: Mapping[str, Any]) -> dict[str, Any]:
  """True where a param trains: the release's set (`frozen_param_patterns(config.model)`,
  SPEC 9), plus the paths a `config.train.unfreeze` regex matches, minus those a
  `config.train.freeze` regex matches (both over '/'-joined paths of `params`: plain, boxed or
  abstract). A regex that matches no path raises ValueError."""
  train = config["train"]
  release = _flat(trainable_lib.unfrozen_mask(params, frozen_param_patterns(config["model"])))
  paths = ["/".join(path) for path in release]
  unfreeze = _compile_all(train.get("unfreeze", ()), paths, "unfreeze")
  freeze = _compile_all(train.get("freeze", ()), paths, "freeze")
  mask = {}
  for path, trains in release.items():
    joined = "/".join(path)
    trains = trains or any(p.search(joined) for p in unfreeze)
    mask[path] = trains and not any(p.search(joined) for p in freeze)
  return traverse_util.unflatten_dict(mask)


# --- weight decay ----------------------------------------------------------------------------


def mirrors_torch_layer_norm(module_class: type) -> bool:
  """Whether a Flax module class stands for `torch.nn.LayerNorm` (HF's ALL_LAYERNORM_LAYERS in
  4.31): `nn.LayerNorm` and subclasses, except `ChannelsFirstLayerNorm` (the ViT-Adapter's own
  module class). RMSNorm and GroupNorm are not."""
  return (issubclass(module_class, nn.LayerNorm)
          and not issubclass(module_class, ChannelsFirstLayerNorm))


def param_owners(model: nn.Module, *init_args, **init_kwargs) -> dict[Path, set[type]]:
  """`{param path: classes of the module(s) at its scope}`, recorded while `model.init(key,
  *init_args, **init_kwargs)` is traced abstractly (`jax.eval_shape`; args may be shape
  structs). More than one class appears where modules share a scope (`nn.share_scope`)."""
  classes: dict[Path, set[type]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is not None:
      classes.setdefault(tuple(module.scope.path), set()).add(type(module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract = jax.eval_shape(
        lambda *args: model.init(jax.random.key(0), *args, **init_kwargs)["params"],
        *init_args)
  owners = {}
  for path in _flat(abstract):
    if path[:-1] not in classes:
      raise ValueError(f"no module call was recorded at {'/'.join(path[:-1])!r}, the scope of "
                       f"param {'/'.join(path)!r}")
    owners[path] = classes[path[:-1]]
  return owners


def weight_decay_mask(model: nn.Module, *init_args, name: Callable[[Path], str] = release_name,
                      **init_kwargs) -> dict[str, Any]:
  """True where AdamW decays a param of `model` (a tree like its params): HF Trainer's decay
  parameters, i.e. not a param of a module mirroring `torch.nn.LayerNorm` (by the owning
  module's class, `param_owners`) and "bias" not in its torch name (`name(path)`, the release's
  state-dict name by default; a substring, as HF tests it)."""
  mask = {}
  for path, owners in param_owners(model, *init_args, **init_kwargs).items():
    kinds = {mirrors_torch_layer_norm(owner) for owner in owners}
    if len(kinds) > 1:
      raise ValueError(f"{'/'.join(path)}: its scope is shared by modules of classes "
                       f"{sorted(c.__name__ for c in owners)}; which one owns it is ambiguous")
    mask[path] = not kinds.pop() and "bias" not in name(path)
  return traverse_util.unflatten_dict(mask)


def release_weight_decay_mask(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """`weight_decay_mask` of the whole `MMInterleaved` of `model_config` (traced abstractly on
  `example_batch`; seconds for the tiny model)."""
  return weight_decay_mask(MMInterleaved.from_config(model_config), example_batch(model_config))


# --- groups and schedule ---------------------------------------------------------------------


def group_settings(train_config: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
  """`{label: (learning rate, weight decay)}` in matching order, the default group last.
  Labels are the `param_groups` patterns; a None weight decay is `train.weight_decay`."""
  groups = {}
  for pattern, lr, wd in train_config["param_groups"]:
    if pattern in groups or pattern == DEFAULT_GROUP:
      raise UsageError(f"train.param_groups: pattern {pattern!r} is repeated or reserved")
    groups[pattern] = (float(lr), float(train_config["weight_decay"] if wd is None else wd))
  groups[DEFAULT_GROUP] = (float(train_config["learning_rate"]),
                           float(train_config["weight_decay"]))
  return groups


def param_groups(params: Any, config: Mapping[str, Any], *, check: bool = True
                 ) -> dict[str, Any]:
  """The group label of every param of `params` (a tree like it): the first
  `config.train.param_groups` pattern that is a substring of the param's release name, else
  `DEFAULT_GROUP`. With `check`, a pattern that matches no param raises ValueError (pass the
  whole model's params then: freezing may legitimately empty a group of trainable params)."""
  patterns = [pattern for pattern, _, _ in config["train"]["param_groups"]]
  labels = {}
  for path in _flat(params):
    key = release_name(path)
    labels[path] = next((p for p in patterns if p in key), DEFAULT_GROUP)
  if check:
    unused = [p for p in patterns if p not in labels.values()]
    if unused:
      raise UsageError(f"train.param_groups: patterns {unused} match no param's release name "
                       f"(names look like {release_name(next(iter(labels)))!r})")
  return traverse_util.unflatten_dict(labels)


def learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
  """The multiplier of every group's learning rate at optimizer step `count` (0-based): HF's
  `get_cosine_schedule_with_warmup(warmup_steps, num_training_steps=steps)`, 0 at step 0,
  linear to 1 at `warmup_steps`, half a cosine down to 0 at `steps` (and 0 after)."""
  if train_config.get("schedule", "cosine") != "cosine":
    raise UsageError(f"train.schedule: unknown schedule {train_config['schedule']!r} "
                     "(only 'cosine')")
  warmup, steps = int(train_config["warmup_steps"]), int(train_config["steps"])
  if not 0 <= warmup < steps:
    raise UsageError(f"train.warmup_steps {warmup} and train.steps {steps}: need 0 <= "
                     "warmup_steps < steps")
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1.0,
                                            warmup_steps=warmup, decay_steps=steps)


def group_learning_rates(config: Mapping[str, Any], step: int) -> dict[str, float]:
  """`{label: learning rate}` of every group at optimizer step `step` (for logging)."""
  multiplier = float(learning_rate_schedule(config["train"])(step))
  return {label: lr * multiplier for label, (lr, _) in group_settings(config["train"]).items()}


def _restrict(tree: Any, paths: Sequence[Path], what: str) -> dict[str, Any]:
  """`tree` (over the whole params or over `paths`) restricted to `paths`."""
  flat = _flat(tree)
  missing = [path for path in paths if path not in flat]
  if missing:
    raise ValueError(f"{what} has no entry for {'/'.join(missing[0])} "
                     f"({len(missing)} trainable params missing)")
  return traverse_util.unflatten_dict({path: flat[path] for path in paths})


def make_optimizer(config: Mapping[str, Any], trainable_params: Any, decay_mask: Any,
                   labels: Any = None) -> optax.GradientTransformation:
  """The release's optimizer over the trainable params (the tree
  `mmi_jax.trainable.split_params` returns).

  Args:
    config: the whole config; reads `config.train` (`learning_rate`, `weight_decay`,
      `adam_b1`, `adam_b2`, `adam_eps`, `max_grad_norm`, `param_groups`, the schedule).
    trainable_params: the trainable params (plain, boxed or abstract); only their tree matters.
    decay_mask: `weight_decay_mask` (over the whole params or the trainable ones).
    labels: group labels (`param_groups`, over the whole or the trainable params); None:
      computed from `trainable_params`.
  Returns:
    `clip_by_global_norm(max_grad_norm)` (skipped when 0 or None), then per group AdamW with
    the group's lr times `learning_rate_schedule`, decaying where `decay_mask` is True by the
    group's weight decay. Its state holds Adam's two moments per trainable param and counters.
  """
  train = config["train"]
  paths = list(_flat(trainable_params))
  if labels is None:
    labels = param_groups(trainable_params, config, check=False)
  labels = _restrict(labels, paths, "labels")
  decay_mask = _restrict(decay_mask, paths, "decay_mask")
  settings = group_settings(train)
  used = set(_flat(labels).values())
  unknown = used - settings.keys()
  if unknown:
    raise ValueError(f"labels {sorted(unknown)} are not param groups of config.train")
  multiplier = learning_rate_schedule(train)

  def group(lr: float, wd: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate=lambda count: lr * multiplier(count), b1=train["adam_b1"],
                       b2=train["adam_b2"], eps=train["adam_eps"], weight_decay=wd,
                       mask=decay_mask)

  transforms = {label: group(*settings[label]) for label in settings if label in used}
  steps = [optax.multi_transform(transforms, labels)]
  if train.get("max_grad_norm"):
    steps.insert(0, optax.clip_by_global_norm(float(train["max_grad_norm"])))
  return optax.chain(*steps)


__all__ = ["DEFAULT_GROUP", "group_learning_rates", "group_settings", "learning_rate_schedule",
           "make_optimizer", "mirrors_torch_layer_norm", "param_groups",
           "param_owners", "release_weight_decay_mask", "trainable_mask",
           "weight_decay_mask"]
