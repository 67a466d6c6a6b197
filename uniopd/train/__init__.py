"""The training loop and its parts: strategy, update, token advantages, checkpoints, metrics."""
