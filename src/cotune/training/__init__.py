"""Local training: optimizer, schedule, the training step."""
