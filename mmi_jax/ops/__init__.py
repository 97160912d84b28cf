"""Numerical ops shared by the models."""

from mmi_jax.ops.deformable_sampling import deformable_sample

__all__ = ["deformable_sample"]
