"""Random values for an abstract param tree, scaled so that deep stacks stay well-conditioned."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np


def random_params(abstract, seed=0, dtype=None):
  """Fan-in scaled kernels, norm scales near 1, everything else (biases, gates, tables, zero
  convs) small but non-zero, so every path of a model affects its output.

  Args:
    abstract: a (boxed) tree of shape structs or arrays.
    dtype: the leaves' dtype (None: each leaf's own).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "embedding":
      value = rng.standard_normal(leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return np.asarray(value, dtype or leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))
