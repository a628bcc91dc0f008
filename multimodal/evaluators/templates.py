"""Prompt templates for zero-shot classification, by name.

A class's text embedding is the renormalised mean over its templates, as in
CLIP. The names are what a config's `templates` key takes.
"""

TEMPLATES = {
    "simple": ("a photo of a {}.",),
    "shapes_shape": (
        "a {}.", "a photo of a {}.", "an image of a {}.", "a picture of a {}.",
        "there is a {}.", "a {} shape.",
    ),
    "shapes_colour": (
        "a {} shape.", "a photo of a {} object.", "an image of something {}.",
        "a {} thing.", "there is a {} object.", "something {}.",
    ),
}


def get(name: str) -> tuple[str, ...]:
  if name not in TEMPLATES:
    raise ValueError(
        f"unknown template set '{name}'; known sets: {sorted(TEMPLATES)}.")
  return TEMPLATES[name]
