"""The train state, where each of its arrays lives on the mesh, and how it is created.

`TrainState` holds the trainable params (float32, optimized), the frozen params (never
updated, no optimizer state), the optimizer state, the step and the base rng. `TrainSetup`
builds, from the config and the mesh, everything the train step needs that does not change
during training: the model, the optimizer, the trainable mask and the state's shardings
(every param, frozen ones included, and every optimizer-state leaf placed by the logical-axis
rules of `mmi_jax.sharding`). It is created once; `init_state` makes the state directly in
its shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmi_jax import sharding
from mmi_jax import trainable as trainable_lib
from mmi_jax.models.batch import Batch
from mmi_jax.models.mm_interleaved import MMInterleaved
from mmi_jax.train import optimizer as optimizer_lib

BATCH_AXIS = "activation_batch"  # rows and image slots of a batch


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed whole).

  Attributes:
    step: int32 `[]`, optimizer steps done.
    params: the trainable params (nested dict, `param_dtype`).
    frozen: the frozen params (nested dict), never updated.
    opt_state: the optimizer's state over `params` only.
    rng: uint32 `[2]`, the base key's data; step s draws from `fold_in(key, s)`.
  """

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)

  def all_params(self) -> dict[str, Any]:
    """The whole model's params (trainable and frozen merged)."""
    return trainable_lib.merge_params(self.params, self.frozen)


def training_model(config: Mapping[str, Any], image_slots: int | None = None) -> MMInterleaved:
  """The `MMInterleaved` of `config.model` with the training settings of `config.train`:
  compute `model.dtype`, storage `model.param_dtype`, remat policy and attention kernel.

  Args:
    image_slots: image slots per sequence of the LLM's synchronizer (the data's images per
      row); None: the batch's whole image slot count.
  """
  model, train = config["model"], config["train"]
  return MMInterleaved.from_config(
      model, dtype=jnp.dtype(model["dtype"]), param_dtype=jnp.dtype(model["param_dtype"]),
      remat_policy=train["remat_policy"] or None,
      attention_implementation=train["attention_implementation"] or None,
      image_slots=image_slots)


def batch_shardings(batch: Batch, mesh: Mesh, leading_axes: int = 0) -> Batch:
  """`NamedSharding`s for a batch: rows and image slots split over the batch axes of the mesh
  (`activation_batch`: data and fsdp), after `leading_axes` unsplit axes (gradient
  accumulation's micro-batch axis); a dim that does not divide is replicated."""

  def leaf_sharding(leaf):
    names = (None,) * leading_axes + (BATCH_AXIS,) + (None,) * (np.ndim(leaf) - 1 - leading_axes)
    return NamedSharding(mesh, sharding.logical_to_spec(names, np.shape(leaf), mesh.shape))

  return jax.tree.map(leaf_sharding, batch)


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Each optimizer-state leaf sharded like the param it mirrors (found by the dict keys of
  its tree path and its shape; Adam's moments), replicated otherwise (counters)."""
  flat = traverse_util.flatten_dict(param_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(path, leaf):
    keys = tuple(entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey))
    for start in range(len(keys)):
      found = flat.get(keys[start:])
      if found is not None and len(found.spec) <= len(leaf.shape):
        return found
    return replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The fixed parts of training.

  Attributes:
    config: the whole config.
    model: the `MMInterleaved`.
    optimizer: the optax transformation over the trainable params.
    mesh: the device mesh.
    example_batch: a batch of the training shape (shape structs), for `init`.
    trainable_mask: a tree like the params, True where a param trains.
    abstract_params: the whole model's params as boxed shape structs.
    state_shardings: a `TrainState` of `NamedSharding`s.
  """

  config: Any
  model: MMInterleaved
  optimizer: optax.GradientTransformation
  mesh: Mesh
  example_batch: Batch
  trainable_mask: Any
  abstract_params: Any
  state_shardings: TrainState

  @classmethod
  def create(cls, config: Any, mesh: Mesh, example: Batch, *,
             image_slots: int | None = None) -> "TrainSetup":
    """Builds the model, the optimizer and the shardings (traced abstractly: nothing is
    allocated).

    Args:
      config: the whole config.
      mesh: the mesh (`sharding.make_mesh(config.mesh)`).
      example: a batch of the training shape (arrays or shape structs), without the
        accumulation axis.
      image_slots: image slots per sequence of the LLM's synchronizer.
    """
    model = training_model(config, image_slots)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype)
                           if not isinstance(x, jax.ShapeDtypeStruct) else x, example)
    abstract = sharding.abstract_params(model, example)
    mask = optimizer_lib.trainable_mask(abstract, config)
    optimizer_lib.param_groups(abstract, config)  # every group pattern must match a param
    decay = optimizer_lib.weight_decay_mask(model, example)
    trainable, frozen = trainable_lib.split_params(nn.meta.unbox(abstract), mask)
    optimizer = optimizer_lib.make_optimizer(config, trainable, decay)
    param_shardings = sharding.param_shardings(abstract, mesh)
    trainable_shardings, frozen_shardings = trainable_lib.split_params(param_shardings, mask)
    abstract_opt_state = jax.eval_shape(optimizer.init, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated, params=trainable_shardings, frozen=frozen_shardings,
        opt_state=opt_state_shardings(abstract_opt_state, trainable_shardings, mesh),
        rng=replicated)
    return cls(config=config, model=model, optimizer=optimizer, mesh=mesh,
               example_batch=example, trainable_mask=mask, abstract_params=abstract,
               state_shardings=shardings)

  def abstract_state(self) -> TrainState:
    """The state as shape structs carrying their shardings (Orbax restores into these)."""
    params = nn.meta.unbox(self.abstract_params)
    trainable, frozen = trainable_lib.split_params(params, self.trainable_mask)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                       frozen=frozen, opt_state=jax.eval_shape(self.optimizer.init, trainable),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        state, self.state_shardings)

  def state_from_params(self, params: Any, rng: jax.Array) -> TrainState:
    """A fresh state (step 0, new optimizer state) around the whole model's `params`
    (arrays already placed by `param_shardings`, or host arrays); runs under jit."""
    trainable, frozen = trainable_lib.split_params(params, self.trainable_mask)

    def create(trainable, frozen, rng):
      return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                        opt_state=self.optimizer.init(trainable),
                        rng=jax.random.key_data(rng))

    shardings = self.state_shardings
    with sharding.use_mesh(self.mesh):
      return jax.jit(create, in_shardings=(shardings.params, shardings.frozen, None),
                     out_shardings=shardings)(trainable, frozen, rng)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    """The model's initial params, created directly in their shards (jit with out_shardings).

    On CPUs, where XLA compiles the ~10^3 initializer kernels of the whole model in minutes,
    the params are made by `lazy_init` (the initializers alone, op by op) and then placed.
    """
    shardings = trainable_lib.merge_params(self.state_shardings.params,
                                           self.state_shardings.frozen)
    if self.mesh.devices.flat[0].platform == "cpu":
      params = nn.meta.unbox(self.model.lazy_init({"params": rng}, self.example_batch)["params"])
      return jax.device_put(params, shardings)

    def init(rng):
      batch = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), self.example_batch)
      return nn.meta.unbox(self.model.init({"params": rng}, batch)["params"])

    with sharding.use_mesh(self.mesh):
      return jax.jit(init, out_shardings=shardings)(rng)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state: params from `rng` (split off), step 0."""
    params_rng, state_rng = jax.random.split(rng)
    return self.state_from_params(self.init_params(params_rng), state_rng)


__all__ = ["BATCH_AXIS", "TrainSetup", "TrainState", "batch_shardings", "training_model",
           "opt_state_shardings"]
