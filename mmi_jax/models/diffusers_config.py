"""Reading a diffusers model config (`config.json`) into one of mmi_jax's config dataclasses.

A diffusers config lists every constructor argument of its class. The keys a dataclass has
become its fields; the keys that select another model family (class embeddings, other block
types, ...) must keep the value mmi_jax builds, else `NotImplementedError` names them all;
keys starting with `_` (`_class_name`, `_diffusers_version`) and known irrelevant ones are
skipped; anything else is unknown and a `ValueError`. Lists become tuples (hashable configs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


def _is_supported(value: Any, expected: Any) -> bool:
  if expected is None:
    return value in (None, False, 0)
  if isinstance(expected, tuple) and isinstance(value, (list, tuple)):
    return all(entry in expected for entry in value)  # block types: each one supported
  return value == expected


def config_from_mapping(cls: type, section: Mapping[str, Any], *, fixed: Mapping[str, Any],
                        ignored: Sequence[str] = (), family: str) -> Any:
  """`cls(**fields)` from `section` (a diffusers config dict or a config section).

  Args:
    cls: the config dataclass.
    section: keys and values.
    fixed: keys outside `cls` and the only value supported for each (None: None or false;
      a tuple: the allowed entries of a list value).
    ignored: keys to skip.
    family: what is built, for the error message.
  """
  names = {field.name for field in dataclasses.fields(cls)}
  values, unsupported, unknown = {}, [], []
  for key in section.keys():
    value = section[key]
    if key.startswith("_") or key in ignored:
      continue
    if key in names:
      values[key] = tuple(value) if isinstance(value, list) else value
    elif key in fixed:
      if not _is_supported(value, fixed[key]):
        unsupported.append(f"{key}={value!r} (supported: {fixed[key]!r})")
    else:
      unknown.append(key)
  if unsupported:
    raise NotImplementedError(f"only {family} is built; unsupported settings: "
                              + ", ".join(unsupported))
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
  return cls(**values)
