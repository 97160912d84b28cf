"""The check that a config names only settings mmi_jax knows.

Every setting exists in `configs/mmi_13b.py` (the release), which is the schema: a config
built from it and changed with `update` cannot gain a key by accident, but one written by hand
or a typo in a config file (`config.train.learnig_rate = ...`) can, and would silently do
nothing. `check_known_keys` refuses such a config at once, naming each unknown key and the
closest known one. (Command-line overrides of unknown keys are refused by ml_collections.)
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
from typing import Any

REFERENCE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "mmi_13b.py"


def flat_keys(config: Any, prefix: str = "") -> set[str]:
  """Dotted names of every leaf setting (`train.learning_rate`)."""
  keys = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      keys |= flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


def reference_keys() -> set[str]:
  spec = importlib.util.spec_from_file_location("mmi_13b_reference_config", REFERENCE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  reference = flat_keys(module.get_config())
  # A section may be None (a text-only model has no image decoder).
  return reference | {key.rsplit(".", 1)[0] for key in reference if "." in key}


def check_known_keys(config: Any) -> None:
  """Raises ValueError listing every key of `config` that `configs/mmi_13b.py` lacks."""
  known = reference_keys()
  unknown = sorted(flat_keys(config) - known)
  if unknown:
    lines = []
    for key in unknown:
      close = difflib.get_close_matches(key, known, n=1)
      lines.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ValueError("config: unknown settings (every setting is defined in "
                     "configs/mmi_13b.py):\n  " + "\n  ".join(lines))


__all__ = ["check_known_keys", "flat_keys", "reference_keys"]
