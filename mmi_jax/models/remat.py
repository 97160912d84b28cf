"""Rematerialization of repeated layers (activation checkpointing), by policy name.

Every stack of layers (CLIP's encoder, the LLM, the UNet's and the VAE's resnets and
transformers, the MMFS net) wraps its layer class with `remat_layer` and the model's
`remat_policy` setting (`config.train.remat_policy`).
"""

from __future__ import annotations

import flax.linen as nn
import jax


def remat_layer(layer_cls: type[nn.Module], policy: str | None) -> type[nn.Module]:
  """`layer_cls` rematerialized with `jax.checkpoint_policies.<policy>`; None: unchanged."""
  if policy is None:
    return layer_cls
  if not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"unknown remat policy {policy!r}; use a name in jax.checkpoint_policies")
  return nn.remat(layer_cls, policy=getattr(jax.checkpoint_policies, policy))


__all__ = ["remat_layer"]
