"""Trains a model, or evaluates one step of a training run.

  python -m mmi_jax.train --config=configs/demo.py --workdir=DIR [--config.train.steps=N ...]
      trains the model of the config in DIR, resuming from its latest checkpoint
      (`mmi_jax.train.loop` says what it does and writes);
  python -m mmi_jax.train --config=configs/demo.py --workdir=DIR --mode=eval [--step=N]
      evaluates the checkpoint of step N (default: the latest) of the run in DIR, with the
      config's evaluating extensions, into DIR/evaluations/step_N/; the run stays as it was
      (`mmi_jax.train.evaluate_step`).

`--config` is an ml_collections config file (`configs/demo.py`, `configs/demo.py:text_only`,
`configs/mmi_13b.py`); `--config.x.y=value` overrides a setting (an unknown one is refused).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from mmi_jax import command_line

PROGRAM = "python -m mmi_jax.train"


def _flag_values(argv: list[str]) -> flags.FlagValues:
  """The command's flags; `argv` is the command line the config's overrides come from."""
  values = flags.FlagValues()  # private: importing this module defines no global flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                  lock_config=True, flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.",
                      flag_values=values)
  flags.DEFINE_enum("mode", "train", ["train", "eval"],
                    "train, or eval: evaluate one saved step of the run in --workdir.",
                    flag_values=values)
  flags.DEFINE_integer("step", None, "With --mode=eval: the step to evaluate (default: the "
                       "latest).", flag_values=values)
  return values


def main(argv: list[str]) -> None:
  values = _flag_values(list(argv))
  positional = command_line.parse(values, argv, __doc__)
  if positional:
    raise command_line.UsageError(f"unexpected arguments {positional} (flags are --name=value)")
  config = command_line.config_value(values, argv)
  if not values.workdir:
    raise command_line.UsageError("--workdir=DIR is required (where the run's checkpoints, "
                                  "logs and samples go)")
  if values.step is not None and values.mode != "eval":
    raise command_line.UsageError("--step is for --mode=eval (training resumes from the "
                                  "latest checkpoint)")
  distributed = config.distributed
  if distributed.process_id <= 0:  # one line a job, from its first process
    print(f"{PROGRAM}: {'evaluating' if values.mode == 'eval' else 'training'} "
          f"{config.get('name', 'the model')} in {values.workdir}; loading JAX and the model "
          "code", flush=True)
  import jax  # noqa: PLC0415 (after the command line's checks: --help and mistakes are instant)

  if distributed.initialize:
    jax.distributed.initialize(
        coordinator_address=distributed.coordinator_address or None,
        num_processes=distributed.num_processes or None,
        process_id=distributed.process_id if distributed.process_id >= 0 else None)
  log = lambda message: print(message, flush=True)  # noqa: E731
  if values.mode == "eval":
    from mmi_jax.train.evaluate_step import evaluate_step  # noqa: PLC0415

    results = evaluate_step(config, values.workdir, values.step, log=log)
  else:
    from mmi_jax.train.loop import train_and_evaluate  # noqa: PLC0415

    results = train_and_evaluate(config, values.workdir, log=log)
  if jax.process_index() == 0:
    print({key: value for key, value in results.items() if not isinstance(value, list)},
          flush=True)


if __name__ == "__main__":
  command_line.run(main, sys.argv, PROGRAM)
