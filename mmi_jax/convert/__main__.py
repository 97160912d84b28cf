"""Converts checkpoints between this code, the release's PyTorch format and the standard
Hugging Face / diffusers parts.

  python -m mmi_jax.convert release-to-jax SRC DST --config=configs/mmi_13b.py
      the release's PyTorch state dict (file, shard index or directory) -> an Orbax checkpoint
      of the params at DST;
  python -m mmi_jax.convert jax-to-release SRC DST --config=... [--step=N] [--dtype=bfloat16]
      SRC, a training workdir (its checkpoint of step N, default the latest) or an Orbax
      params checkpoint -> the release's state dict as safetensors shards in DST;
  python -m mmi_jax.convert export SRC DST --config=... [--step=N] [--dtype=...]
      SRC as above -> Hugging Face / diffusers directories of its standard parts
      (DST/llama, DST/unet, DST/vae, DST/clip_vision);
  python -m mmi_jax.convert count --config=...
      the model's parameter count, total and trainable, computed abstractly.

`--config` is an ml_collections config file, the one the model was trained with
(`--config.model.x=y` overrides fields).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from mmi_jax import command_line

COMMANDS = {"release-to-jax": 2, "jax-to-release": 2, "export": 2, "count": 0}


def _flag_values(argv: list[str]) -> flags.FlagValues:
  """The command's flags; `argv` is the command line the config's overrides come from."""
  values = flags.FlagValues()  # private: importing this module defines no global flags
  config_flags.DEFINE_config_file("config", None, "The model's ml_collections config file.",
                                  flag_values=values, sys_argv=argv)
  flags.DEFINE_string("dtype", None, "dtype of the written params (default: keep)",
                      flag_values=values)
  flags.DEFINE_integer("step", None, "With a training workdir as SRC: the step to convert "
                       "(default: the latest).", flag_values=values)
  flags.DEFINE_integer("max_shard_mb", 5 * 1024, "largest safetensors shard in MiB",
                       flag_values=values)
  flags.DEFINE_boolean("progress", True, "show progress bars", flag_values=values)
  return values


def _read_params(path: str, model_config, dtype, step: int | None):
  """The params of SRC: a training workdir's checkpoint of `step`, or an Orbax params
  checkpoint (read into the shapes of `model_config`, in `dtype`)."""
  from mmi_jax.convert import training_run  # noqa: PLC0415

  if training_run.is_training_run(path):
    try:
      step, params = training_run.read_params(path, step)
    except ValueError as error:
      raise command_line.UsageError(str(error)) from None
    print(f"read the params of step {step} of the training run in {path}")
    return params
  return _read_orbax(path, model_config, dtype)


def _read_orbax(path: str, model_config, dtype):
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  import flax.linen as nn  # noqa: PLC0415

  from mmi_jax.convert import release  # noqa: PLC0415

  abstract = nn.meta.unbox(release.param_shapes(model_config, dtype))
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), abstract)
  return ocp.StandardCheckpointer().restore(path, target)


def main(argv: Sequence[str]) -> None:
  """`argv`: `[program, command, *paths, *flags]`."""
  values = _flag_values(list(argv))
  positional = command_line.parse(values, argv, __doc__)
  if not positional or positional[0] not in COMMANDS:
    raise command_line.UsageError(
        f"the first argument is the command, one of {', '.join(COMMANDS)}; got "
        f"{positional[0] if positional else 'none'} (--help tells more)")
  command, paths = positional[0], positional[1:]
  if len(paths) != COMMANDS[command]:
    raise command_line.UsageError(
        f"{command} takes {COMMANDS[command]} paths" + (" (SRC DST)" if COMMANDS[command] else "")
        + f", got {len(paths)}: {paths}")
  config = command_line.config_value(values, argv)
  model_config = config.model
  if values.step is not None and not (command in ("jax-to-release", "export")
                                      and os.path.isdir(os.path.join(paths[0], "checkpoints"))):
    raise command_line.UsageError("--step is for jax-to-release and export from a training "
                                  "workdir (SRC with a checkpoints directory)")
  if command != "count" and not os.path.exists(paths[0]):
    raise command_line.UsageError(f"SRC {paths[0]} does not exist")

  from mmi_jax.convert import release  # noqa: PLC0415 (after argument errors: instant)

  if command == "count":
    from flax import traverse_util  # noqa: PLC0415
    import flax.linen as nn  # noqa: PLC0415

    from mmi_jax import trainable  # noqa: PLC0415
    from mmi_jax.models.mm_interleaved import frozen_param_patterns  # noqa: PLC0415

    abstract = release.param_shapes(model_config)
    mask = trainable.unfrozen_mask(abstract, frozen_param_patterns(model_config))
    total, trained = trainable.count_params(abstract), trainable.count_params(abstract, mask)
    print(f"{config.get('name', 'model')}: {total:,} parameters, {trained:,} trainable, "
          f"{len(traverse_util.flatten_dict(nn.meta.unbox(abstract)))} tensors")
    return
  source, destination = paths
  if command == "release-to-jax":
    import orbax.checkpoint as ocp  # noqa: PLC0415

    params = release.load(source, model_config, dtype=values.dtype, progress=values.progress)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(destination, params)
    checkpointer.wait_until_finished()
    print(f"wrote {destination}")
    return
  params = _read_params(source, model_config, values.dtype, values.step)
  if command == "jax-to-release":
    files = release.save(params, model_config, destination, dtype=values.dtype,
                         max_shard_bytes=values.max_shard_mb * 2**20,
                         progress=values.progress)
    print(f"wrote {len(files)} files to {destination}")
  else:
    from mmi_jax.convert import export  # noqa: PLC0415

    # Each part the model has; one its format cannot hold is named, the others are written.
    refused = []
    for name in export.parts(model_config):
      try:
        directory = export.EXPORTS[name](params, model_config, os.path.join(destination, name),
                                         dtype=values.dtype)
        print(f"{name}: {directory}")
      except export.UnrepresentableError as error:
        print(f"{name}: not exported: {error}", file=sys.stderr)
        refused.append(name)
    if refused:
      raise SystemExit(1)


if __name__ == "__main__":
  command_line.run(main, sys.argv, "python -m mmi_jax.convert")
