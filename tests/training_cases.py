"""Configs, setups and trained states shared by the training and demo tests.

The functions that compile are cached, and the tests that use them share a pytest-xdist group
(`--dist loadgroup`), so that each program compiles once per session.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import demo, tiny
from mmi_jax import sharding
from mmi_jax.data import pipeline
from mmi_jax.train.batches import global_batch
from mmi_jax.train.train_state import TrainSetup
from mmi_jax.train.train_step import compile_train_step
from random_params import random_params

# The tests train a smaller LLM (2 layers: MMFS in the first, a plain one after), to compile
# faster; the training code is the same.
LLM_LAYERS = 2
WHOLE_MODEL_GROUP = pytest.mark.xdist_group("whole_model")
TEXT_ONLY_GROUP = pytest.mark.xdist_group("text_only_model")


def small_model(model_config):
  """`model_config` (the demo's, changed in place) with the tests' smaller parts: the LLM of
  `LLM_LAYERS`, and a UNet of 2 levels, a cross-attention one and a plain one (the demo: 3 of
  cross-attention and a plain one), with their MMFS net blocks. Every kind of block of the
  release stays; the programs compile in about half the time."""
  model_config.llm.num_layers = LLM_LAYERS
  decoder = model_config.get("image_decoder")
  if decoder is not None:
    decoder.unet.update(block_out_channels=(32, 64), attention_head_dim=(2, 4),
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # Skips: conv_in and the first resnet (8 x 8), the downsample and the second resnet (4 x 4).
    decoder.mmfs.update(base_spatial_shapes=(8, 8, 4, 4), mid_base_spatial_shape=4)
  return model_config


def small_config(variant: str = "", **data):
  config = demo.get_config(variant)
  config.data.update(batch_size=4, **data)
  config.train.update(steps=6, warmup_steps=1)  # as the training commands of test_train_command
  small_model(config.model)
  return config


def setup_for(config, mesh_shape=(1, 1, 1)):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  data = pipeline.make_dataset(config, "train")
  example = global_batch([data[0][0]], mesh)
  return TrainSetup.create(config, mesh, example,
                           image_slots=pipeline.image_slots_per_row(config.data)), data, mesh


def leaves(tree):
  """`{key path: host array}` of any pytree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def flat(tree):
  return {"/".join(path): np.asarray(leaf)
          for path, leaf in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@functools.lru_cache(maxsize=None)
def two_whole_model_steps():
  """The demo-sized model with exactly the release's trainable set and groups (SPEC 9), after
  2 steps: `(config, setup, params before, state, last metrics)`."""
  config = small_config()
  config.train.unfreeze = ()
  config.train.param_groups = tiny.get_config().train.param_groups
  setup, data, mesh = setup_for(config)
  # Random values in place of the initialisers (`init_state`): what trains and what stays
  # frozen does not depend on them, and on CPUs the model's initialisers run op by op for
  # minutes. The training commands of test_train_command.py start from `init_state`.
  state = setup.state_from_params(random_params(setup.abstract_params), jax.random.key(0))
  before = flat(state.all_params())
  step = None
  for index in range(2):
    batch = global_batch([data[index][0]], mesh)
    step = step or compile_train_step(setup, batch)
    state, metrics = step(state, batch)
  return config, setup, before, state, metrics


@functools.lru_cache(maxsize=None)
def text_only_params():
  """Random values for the text-only model's params (as `two_whole_model_steps`; the
  training commands of test_train_command.py start from the initialisers)."""
  config = small_config("text_only")
  setup, _, _ = setup_for(config)
  return random_params(setup.abstract_params, seed=1)


@functools.lru_cache(maxsize=None)
def run_steps(mesh_shape, steps=3):
  """`steps` steps of the text-only model on a mesh, from `text_only_params`."""
  config = small_config("text_only")
  setup, data, mesh = setup_for(config, mesh_shape)
  state = setup.state_from_params(text_only_params(), jax.random.key(2))
  step, losses = None, []
  for index in range(steps):
    batch = global_batch([data[index][0]], mesh)
    step = step or compile_train_step(setup, batch)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return setup, state, losses
