"""Flax Linen modules of MM-Interleaved, one component per file (see the README's layout)."""
