"""The one trainer and what it needs: optimizer, accumulation, checkpoints, preemption, metrics."""
