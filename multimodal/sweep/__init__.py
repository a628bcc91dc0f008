"""Hyperparameter sweeps: points, where they run, and their report."""
