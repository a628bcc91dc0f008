"""Evaluators: each turns params into a dict of named metrics."""
