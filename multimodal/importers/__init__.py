"""Importers of pretrained weights (diffusers directories) into our Flax models."""
