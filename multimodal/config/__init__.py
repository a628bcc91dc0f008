"""Experiment configs: arg strings, dotted keys, loading, and the checks that
need neither data nor models."""
