"""Training: the loop, optimizers, checkpoints, summaries."""
