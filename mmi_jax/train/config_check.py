"""The check that a config names only settings something reads.

The release's config (`configs/mmi_13b.py`) is the schema of every setting of the models, the
data and the training core; each extension a config selects (`config.train.extensions`) adds
the top-level section it owns (`Extension.section`, keys `Extension.settings()`). A config
built from the release's and changed with `update` cannot gain a key by accident, but a typo
in a config file (`config.train.learnig_rate = ...`) can, and would silently do nothing.
`check_config_keys` refuses such a config at once, naming each unknown key and the closest
known one, and each key an extension's section lacks. (Command-line overrides of unknown keys
are refused by ml_collections.)
"""

from __future__ import annotations

import difflib
from typing import Any

from configs import mmi_13b
from mmi_jax.command_line import UsageError
from mmi_jax.train.extensions import extension_classes


def flat_keys(config: Any, prefix: str = "") -> set[str]:
  """Dotted names of every leaf setting (`train.learning_rate`)."""
  keys = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      keys |= flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


def release_keys() -> set[str]:
  """The release config's settings, and its sections (a section may be None: a text-only
  model has no image decoder)."""
  reference = flat_keys(mmi_13b.get_config())
  return reference | {key.rsplit(".", 1)[0] for key in reference if "." in key}


def check_config_keys(config: Any) -> None:
  """Raises ValueError listing every key of `config` that neither the release config nor a
  selected extension's section declares, and every key such a section lacks."""
  known = release_keys()
  declared: set[str] = set()
  for extension in extension_classes(config):
    settings = extension.settings()
    if extension.section is not None and settings is not None:
      declared |= flat_keys(settings, f"{extension.section}.")
  present = flat_keys(config)
  unknown = sorted(present - known - declared)
  missing = sorted(declared - present)
  if unknown or missing:
    lines = []
    for key in unknown:
      close = difflib.get_close_matches(key, known | declared, n=1)
      lines.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    lines += [f"{key} is missing (its extension reads it)" for key in missing]
    raise UsageError("config: unknown or missing settings (configs/mmi_13b.py and the "
                     "sections of config.train.extensions define them):\n  "
                     + "\n  ".join(lines))


# (key, lowest value) of the training core's integer settings.
INTEGER_SETTINGS = (
    ("train.steps", 1), ("train.log_every", 1), ("train.checkpoint_every", 1),
    # 0 would have Orbax keep no checkpoint at all (its `max_to_keep=0`).
    ("train.keep_checkpoints", 1), ("train.eval_every", 0),
    ("train.gradient_accumulation_steps", 1), ("train.warmup_steps", 0),
    ("data.batch_size", 1), ("data.sequence_length", 2), ("data.documents_per_row", 1),
    ("data.max_images_per_sequence", 0), ("data.train_documents", 1),
    ("data.held_out_documents", 0),
)


def check_settings(config: Any) -> None:
  """Raises UsageError naming every training-core setting out of its range (integers below
  their lowest value, `train.warmup_steps >= train.steps`, a learning rate <= 0)."""
  problems = []
  for key, lowest in INTEGER_SETTINGS:
    section, name = key.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      problems.append(f"{key} must be an integer >= {lowest}, got {value!r}")
  train = config.train
  if not problems and train.warmup_steps >= train.steps:
    problems.append(f"train.warmup_steps {train.warmup_steps} must be below train.steps "
                    f"{train.steps}")
  if not float(train.learning_rate) > 0:
    problems.append(f"train.learning_rate must be > 0, got {train.learning_rate!r}")
  if problems:
    raise UsageError("; ".join(problems))


__all__ = ["INTEGER_SETTINGS", "check_config_keys", "check_settings", "flat_keys",
           "release_keys"]
