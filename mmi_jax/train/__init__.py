"""Training: the optimizer, train state and step, checkpoints, evaluation and the CLI."""
