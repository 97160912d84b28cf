"""`python -m mmi_jax.train --config=configs/demo.py --workdir=DIR [--config.train.steps=N ...]`

Trains the model of an ml_collections config file in `--workdir`, resuming from its latest
checkpoint; `--config.x.y=value` overrides any setting (unknown settings are refused). See
`mmi_jax.train.loop` for what it does and writes.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True, flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.",
                               flag_values=_FLAGS)


def main(argv: list[str]) -> None:
  _FLAGS(argv)
  if _FLAGS["config"].value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  config = _CONFIG.value
  distributed = config.distributed
  import jax  # noqa: PLC0415 (after flag parsing: --help and usage errors stay fast)

  if distributed.initialize:
    jax.distributed.initialize(
        coordinator_address=distributed.coordinator_address or None,
        num_processes=distributed.num_processes or None,
        process_id=distributed.process_id if distributed.process_id >= 0 else None)
  from mmi_jax.train.loop import train_and_evaluate  # noqa: PLC0415

  results = train_and_evaluate(config, _WORKDIR.value,
                               log=lambda message: print(message, flush=True))
  if jax.process_index() == 0:
    print({key: value for key, value in results.items() if not isinstance(value, list)},
          flush=True)


if __name__ == "__main__":
  main(sys.argv)
