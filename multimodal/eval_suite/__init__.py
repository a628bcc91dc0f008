"""The zero-shot benchmark suite: encoders, datasets, tasks and result files."""
