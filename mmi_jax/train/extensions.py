"""The training loop's extension points, and how a config selects what runs at them.

`mmi_jax.train.loop.train_and_evaluate` is the training every job runs. A job that needs more
names `Extension` subclasses in `config.train.extensions` ("package.module.Class"); the loop
builds each from the config before it writes anything (an extension refuses bad settings in
its constructor) and calls them, in the order named, at these points:

  * `compile_ahead(run)`: once the model and the state's shardings exist; lower programs for
    the abstract state here and compile them on `run.worker` (in the background);
  * `prepare_params(run, params) -> params`: on a fresh start, after the params are
    initialised or loaded, before the first step (not when resuming);
  * `after_training(run, state) -> state`: after the last step has been saved; its result
    is saved apart (`workdir/after_training/`), and a resumed job that finds it there
    does not run this again;
  * `evaluate(run, params, step) -> {name: value}`: every `train.eval_every` steps and after
    the last.

An extension with settings owns one top-level config section (`section`) and declares its keys
with their defaults (`settings()`): the config check (`mmi_jax.train.config_check`) accepts
that section in a config that selects the extension, and refuses a key it does not declare or
a declared key the section lacks. Its random draws come from the streams it names
(`rng_streams`; `mmi_jax.train.rng_streams`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Mapping

import ml_collections

from mmi_jax.command_line import UsageError
from mmi_jax.train.background import Worker
from mmi_jax.train.metrics_log import MetricsLog
from mmi_jax.train.preemption import Preemption
from mmi_jax.train.rng_streams import RngStreams
from mmi_jax.train.train_state import TrainSetup, TrainState


@dataclasses.dataclass(frozen=True)
class Run:
  """What an extension sees of the running job.

  Attributes:
    config: the whole config.
    workdir: the job's directory.
    setup: the model, optimizer, mesh and state shardings (`TrainSetup`).
    rngs: the job's random streams (`rngs.key(name)` for the extension's own names).
    worker: the background thread that compiles (`background.Worker`).
    logger: log lines, scalars and images (stdout, `metrics.jsonl`, TensorBoard).
    preemption: the job's stop requests (SIGTERM, SIGINT): a long phase calls
      `run.preemption.check(where)` after each unit of its work (a fit step, a part of an
      evaluation), which raises `preemption.Stopped` when the job is asked to stop; every
      process of a job must check at the same points (`preemption`).
  """

  config: Any
  workdir: str
  setup: TrainSetup
  rngs: RngStreams
  worker: Worker
  logger: MetricsLog
  preemption: Preemption = dataclasses.field(default_factory=Preemption)


class Extension:
  """A part of a job that the training loop runs at its extension points; every point does
  nothing unless a subclass overrides it.

  Attributes:
    section: the top-level config section the extension owns, or None.
    rng_streams: `{name: number}` of its random streams (or `{name: stream name}`: an alias
      drawing another stream's key; `rng_streams.RngStreams`).
  """

  section: ClassVar[str | None] = None
  rng_streams: ClassVar[Mapping[str, int | str]] = {}

  def __init__(self, config: Any):
    self.config = config

  @classmethod
  def settings(cls) -> ml_collections.ConfigDict | None:
    """The keys of `config.<section>` with their defaults (None: no section)."""
    return None

  def compile_ahead(self, run: Run) -> None:
    pass

  def prepare_params(self, run: Run, params: Any) -> Any:
    return params

  def after_training(self, run: Run, state: TrainState) -> TrainState:
    return state

  def evaluate(self, run: Run, params: Any, step: int) -> dict[str, Any]:
    return {}


def evaluate(extensions: list[Extension], run: Run, params: Any, step: int) -> dict[str, Any]:
  """The merged results of every extension's `evaluate` of `params` at `step`, logged (the
  scalars to `metrics.jsonl` and TensorBoard under "eval", a line to stdout).
  `run.preemption` is checked after each extension."""
  results = {}
  for extension in extensions:
    results.update(extension.evaluate(run, params, step))
    run.preemption.check(f"the evaluation of step {step}")
  if results:
    run.logger.scalars(step, results, "eval")
    run.logger.log(f"eval at step {step}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float)))
  return results


def extension_classes(config: Any) -> list[type[Extension]]:
  """The classes `config.train.extensions` names, imported; ValueError naming a name that is
  not importable or not an `Extension`."""
  classes = []
  for name in config.train.extensions:
    module_name, _, class_name = str(name).rpartition(".")
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      # A module the name names is missing (a mistake in the config); anything else that
      # fails while the module is imported is the module's own error.
      if not error.name or not module_name.startswith(error.name):
        raise
      raise UsageError(f"config.train.extensions: {name!r} cannot be imported "
                       f"({error})") from error
    found = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, Extension)):
      raise UsageError(f"config.train.extensions: {name!r} is not an "
                       f"mmi_jax.train.extensions.Extension subclass")
    classes.append(found)
  return classes


def rng_tables(extensions: list[Extension]) -> list[tuple[str, Mapping[str, int | str]]]:
  """`(owner, {name: number})` of each extension's random streams, for `RngStreams`."""
  return [(type(extension).__name__, extension.rng_streams) for extension in extensions]


__all__ = ["Extension", "Run", "evaluate", "extension_classes", "rng_tables"]
