"""mmi_jax: MM-Interleaved (arXiv 2401.10208) in JAX/Flax."""
