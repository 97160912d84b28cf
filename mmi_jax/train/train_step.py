"""One optimizer step: the loss's gradient w.r.t. the trainable params only, averaged over
micro-batches, then the optimizer's update; jitted with explicit shardings and donation.

The release's step (HF Trainer with `gradient_accumulation_steps`): each micro-batch's loss is
divided by the number of micro-batches and the gradients summed, i.e. the step's gradient is
the mean of the micro-batch gradients; then clipping and AdamW (`mmi_jax.train.optimizer`).
Here the micro-batches are a leading axis of the batch's arrays, scanned inside one jit
(`lax.scan`), so a step is one device program whatever the accumulation.

Random draws: micro-batch m of step s draws from `fold_in(fold_in(key, s), m)` (the diffusion
loss's noise, timesteps and conditioning dropout, and the visual Q-Former's dropout), so a run
resumed from a checkpoint draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mmi_jax import sharding
from mmi_jax import trainable as trainable_lib
from mmi_jax.models.batch import Batch
from mmi_jax.train import optimizer as optimizer_lib
from mmi_jax.train.train_state import TrainSetup, TrainState, batch_shardings

METRICS = ("loss", "loss_txt", "loss_img", "num_text_targets")


def micro_batch_loss(setup: TrainSetup, trainable: Any, frozen: Any, batch: Batch,
                     rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one micro-batch and its metrics (float32 scalars)."""
  diffusion_rng, dropout_rng = jax.random.split(rng)
  params = trainable_lib.merge_params(trainable, frozen)
  out = setup.model.apply({"params": params}, batch, rng=diffusion_rng, deterministic=False,
                          rngs={"dropout": dropout_rng})
  return out["loss"], {name: out[name].astype(jnp.float32) for name in METRICS}


def loss_and_grads(setup: TrainSetup, state: TrainState, batch: Batch, accumulation: int
                   ) -> tuple[dict[str, jax.Array], Any]:
  """The step's metrics (means over micro-batches) and the mean gradient over the trainable
  params. With `accumulation` > 1, `batch`'s arrays have a leading micro-batch axis."""
  step_key = jax.random.fold_in(state.key, state.step)
  grad_fn = jax.grad(functools.partial(micro_batch_loss, setup), has_aux=True)
  if accumulation == 1:
    grads, metrics = grad_fn(state.params, state.frozen, batch, jax.random.fold_in(step_key, 0))
    return metrics, grads

  def accumulate(carry, inputs):
    grads_sum, metrics_sum = carry
    index, micro_batch = inputs
    grads, metrics = grad_fn(state.params, state.frozen, micro_batch,
                             jax.random.fold_in(step_key, index))
    return (jax.tree.map(jnp.add, grads_sum, grads),
            jax.tree.map(jnp.add, metrics_sum, metrics)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  zero_metrics = {name: jnp.zeros((), jnp.float32) for name in METRICS}
  (grads_sum, metrics_sum), _ = jax.lax.scan(
      accumulate, (zeros, zero_metrics), (jnp.arange(accumulation), batch))
  scale = 1.0 / accumulation
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads_sum, state.params)
  metrics = {name: value * scale for name, value in metrics_sum.items()}
  metrics["num_text_targets"] = metrics_sum["num_text_targets"]
  return metrics, grads


def train_step(setup: TrainSetup, state: TrainState, batch: Batch, accumulation: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step (unjitted; `compile_train_step` jits it).

  Returns the new state and metrics: the loss terms, `grad_norm` (before clipping) and
  `learning_rate` (the default group's).
  """
  metrics, grads = loss_and_grads(setup, state, batch, accumulation)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  schedule = optimizer_lib.learning_rate_schedule(setup.config.train)
  metrics.update(grad_norm=optax.tree.norm(grads),
                 learning_rate=setup.config.train.learning_rate * schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def lower_train_step(setup: TrainSetup, batch: Batch, accumulation: int = 1
                     ) -> jax.stages.Lowered:
  """`train_step` under `jax.jit`, lowered for batches shaped like `batch`: the state in and
  out in `setup.state_shardings` (the input state is donated), the batch split over the batch
  axes, metrics replicated.

  It needs shapes only (`setup.abstract_state()` and `batch`'s), so the training command
  compiles the result (`.compile()`, XLA's part and most of the time) in a background thread
  while the params are initialised, fitted or restored.

  Args:
    batch: arrays or `jax.ShapeDtypeStruct`s of the training shape (with the micro-batch axis
      when `accumulation` > 1).
  """
  mesh = setup.mesh
  batch = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype), batch)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(functools.partial(train_step, setup, accumulation=accumulation),
                 in_shardings=(setup.state_shardings,
                               batch_shardings(batch, mesh, int(accumulation > 1))),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
  state = setup.abstract_state()
  with sharding.use_mesh(mesh):
    return step.lower(state, batch)


def compile_train_step(setup: TrainSetup, batch: Batch, accumulation: int = 1
                       ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`lower_train_step(...)` compiled: `(state, batch) -> (state, metrics)`."""
  return lower_train_step(setup, batch, accumulation).compile()


__all__ = ["METRICS", "compile_train_step", "loss_and_grads", "lower_train_step",
           "micro_batch_loss", "train_step"]
