"""Prompt templates for zero-shot classification, by name.

A class's text embedding is the renormalised mean over its templates, as in
CLIP. The names are what a config's `templates` key takes.
"""

from multimodal.data import shapes_world

TEMPLATES = {
    "simple": ("a photo of a {}.",),
    # Most shapes-world captions name an object's colour with its shape.
    # These sets ensemble over the *other* attribute's words ("a red {}",
    # "a blue {}", ...): the class embedding then marginalises that attribute
    # out, the same prompt ensembling CLIP uses, with in-domain wording.
    "shapes_shape": tuple(
        pattern.format(colour, "{}")
        for colour in shapes_world.COLOURS
        for pattern in ("a {} {}.", "a photo of a {} {}.", "there is a {} {}.")),
    "shapes_colour": tuple(
        pattern.format("{}", shape)
        for shape in shapes_world.SHAPES
        for pattern in ("a {} {}.", "a photo of a {} {}.", "there is a {} {}.")),
    # Generic wording with no in-domain knowledge, for comparison.
    "shapes_shape_generic": (
        "a {}.", "a photo of a {}.", "an image of a {}.", "a picture of a {}.",
        "there is a {}.", "a {} shape.",
    ),
    "shapes_colour_generic": (
        "a {} shape.", "a photo of a {} object.", "an image of something {}.",
        "a {} thing.", "there is a {} object.", "something {}.",
    ),
}


def get(name: str) -> tuple[str, ...]:
  if name not in TEMPLATES:
    raise ValueError(
        f"unknown template set '{name}'; known sets: {sorted(TEMPLATES)}.")
  return TEMPLATES[name]
