"""Command line for checkpoint conversion.

  python -m mmi_jax.convert release-to-jax SRC DST --config=configs/mmi_13b.py
      the release's PyTorch state dict (file, shard index or directory) -> an Orbax checkpoint
      of the params at DST;
  python -m mmi_jax.convert jax-to-release SRC DST --config=... [--dtype=bfloat16]
      an Orbax params checkpoint -> the release's state dict as safetensors shards in DST;
  python -m mmi_jax.convert export SRC DST --config=... [--dtype=...]
      an Orbax params checkpoint -> Hugging Face / diffusers directories of its standard parts
      (DST/llama, DST/unet, DST/vae, DST/clip_vision);
  python -m mmi_jax.convert count --config=...
      the model's parameter count, total and trainable, computed abstractly.

`--config` is an ml_collections config file (`--config.model.x=y` overrides fields).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

COMMANDS = {"release-to-jax": 2, "jax-to-release": 2, "export": 2, "count": 0}


def _flag_values() -> flags.FlagValues:
  values = flags.FlagValues()  # private: importing this module defines no global flags
  config_flags.DEFINE_config_file("config", None, "model config file", flag_values=values)
  flags.DEFINE_string("dtype", None, "dtype of the written params (default: keep)",
                      flag_values=values)
  flags.DEFINE_integer("max_shard_mb", 5 * 1024, "largest safetensors shard in MiB",
                       flag_values=values)
  flags.DEFINE_boolean("progress", True, "show progress bars", flag_values=values)
  return values


def _read_orbax(path: str, model_config, dtype):
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  import flax.linen as nn  # noqa: PLC0415

  from mmi_jax.convert import release  # noqa: PLC0415

  abstract = nn.meta.unbox(release.param_shapes(model_config, dtype))
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), abstract)
  return ocp.StandardCheckpointer().restore(path, target)


def main(argv: Sequence[str]) -> None:
  values = _flag_values()
  positional = values(["mmi_jax.convert", *argv])[1:]
  if not positional or positional[0] not in COMMANDS:
    raise SystemExit(f"usage: python -m mmi_jax.convert {{{'|'.join(COMMANDS)}}} ... "
                     f"--config=FILE; got {list(argv)}")
  command, paths = positional[0], positional[1:]
  if len(paths) != COMMANDS[command]:
    raise SystemExit(f"{command} takes {COMMANDS[command]} paths (SRC DST), got {paths}")
  if values.config is None:
    raise SystemExit("--config=FILE is required (e.g. configs/mmi_13b.py)")
  model_config = values.config.model

  from mmi_jax.convert import release  # noqa: PLC0415 (after argument errors: instant)

  if command == "count":
    from flax import traverse_util  # noqa: PLC0415
    import flax.linen as nn  # noqa: PLC0415

    from mmi_jax import trainable  # noqa: PLC0415
    from mmi_jax.models.mm_interleaved import frozen_param_patterns  # noqa: PLC0415

    abstract = release.param_shapes(model_config)
    mask = trainable.unfrozen_mask(abstract, frozen_param_patterns(model_config))
    total, trained = trainable.count_params(abstract), trainable.count_params(abstract, mask)
    print(f"{values.config.get('name', 'model')}: {total:,} parameters, {trained:,} trainable, "
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
  params = _read_orbax(source, model_config, values.dtype)
  if command == "jax-to-release":
    files = release.save(params, model_config, destination, dtype=values.dtype,
                         max_shard_bytes=values.max_shard_mb * 2**20,
                         progress=values.progress)
    print(f"wrote {len(files)} files to {destination}")
  else:
    from mmi_jax.convert import export  # noqa: PLC0415

    written = export.export_all(params, model_config, destination, dtype=values.dtype)
    for name, directory in written.items():
      print(f"{name}: {directory}")


if __name__ == "__main__":
  main(sys.argv[1:])
