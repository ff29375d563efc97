"""The training loop's parts: settings, optimizer + schedule, checkpoints, metrics."""
