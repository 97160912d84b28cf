"""The released checkpoint's names and shapes (`shared/shapes_13b.json`) for comparisons."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
from flax import traverse_util

from mmi_jax.convert import release
from mmi_jax.param_names import release_key_of_rule, torch_name

SHAPES_13B = pathlib.Path(__file__).resolve().parents[2] / "shared" / "shapes_13b.json"


def release_name_and_shape(path, shape, prefix=""):
  """The release's key and shape for a Flax param of a component under `prefix`
  (`convert.release`'s naming exceptions: MMFS's `query_relpos` and 4-D `ignore_token`,
  diffusers' `time_embedding.linear_1`)."""
  return release_key_of_rule(torch_name(path, prefix)), release.release_shape(path, shape)


def release_shapes_of(abstract_params, prefix=""):
  """`{release key: shape}` of an abstract (or real) param tree."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params))
  return dict(release_name_and_shape(path, tuple(leaf.shape), prefix)
              for path, leaf in flat.items())


def release_state_dict(top_level_prefixes, kinds=("parameter",)):
  """`{key: entry}` of the release's state dict under the given top-level prefixes."""
  state = json.loads(SHAPES_13B.read_text())["state_dict"]
  return {key: entry for key, entry in state.items()
          if key.split(".")[0] in top_level_prefixes and entry["kind"] in kinds}
