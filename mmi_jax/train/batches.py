"""Each process's host batches -> the step's global batch on the mesh.

Every process reads its own rows (`mmi_jax.data.pipeline`); `global_batch` assembles them into
global arrays split over the batch axes of the mesh, `check_batch` refuses a host batch that
does not fit the model before it reaches the devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mmi_jax import batch as batch_lib
from mmi_jax.train.train_state import batch_shardings


def global_batch(local_batches: list[Any], mesh: jax.sharding.Mesh) -> Any:
  """This process's batches (one per micro-batch) -> one global batch; with more than one,
  the arrays get a leading micro-batch axis. Rows and image slots are split over the batch
  axes; each process provides its own rows."""
  if len(local_batches) == 1:
    local, leading = local_batches[0], 0
  else:
    local, leading = jax.tree.map(lambda *xs: np.stack(xs), *local_batches), 1
  processes = jax.process_count()

  def global_shape(x):
    shape = list(np.shape(x))
    shape[leading] *= processes
    return tuple(shape)

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(global_shape(x), np.asarray(x).dtype),
                        local)
  shardings = batch_shardings(shapes, mesh, leading)
  return jax.tree.map(
      lambda x, where, shape: jax.make_array_from_process_local_data(where, np.asarray(x),
                                                                     shape.shape),
      local, shardings, shapes)


def check_batch(batch: Any, config: Any) -> None:
  """Refuses a host batch that does not fit the model (`mmi_jax.batch.validate`: shapes,
  image sizes, each row's soi / `<|image|>` layout against its images). A multi-process
  batch's sequence ids are global rows, so there it checks the shapes only (the pipeline
  validated each process's rows before making their ids global)."""
  if jax.process_count() == 1:
    batch_lib.validate(batch, config.model)
  elif batch.text_ids.shape[1] != config.data.sequence_length:
    raise ValueError(f"batch rows have {batch.text_ids.shape[1]} tokens, config.data."
                     f"sequence_length is {config.data.sequence_length}")


__all__ = ["check_batch", "global_batch"]
