"""Moving weights between PyTorch checkpoints and mmi_jax params (model code stays apart)."""
