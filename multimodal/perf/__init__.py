"""Analytic FLOPs and speed/memory measurement."""
