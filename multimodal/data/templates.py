"""Prompt templates for zero-shot classification, by name.

A class's text embedding is the renormalised mean over its templates, as in
CLIP. The names are what a config's `templates` key takes: this file's own
sets below, "imagenet" (CLIP's 80 ImageNet templates) and every per-dataset set
of CLIP_benchmark ("cifar10", "cars", ...), shipped as package data in
third_party/ with their class names (origin and licence in third_party/NOTICE.md).
"""

import functools
import json
import os
from importlib import resources

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

# The set for a dataset CLIP_benchmark has no templates for.
FALLBACK = "simple"

_TEMPLATES_FILE = "en_zeroshot_classification_templates.json"
_CLASSNAMES_FILE = "en_classnames.json"

# Benchmark dataset names (TFDS's) -> the key CLIP_benchmark's two JSON files
# use. Names the JSON already has need no entry (cifar10, cifar100, dtd,
# food101, sun397, stl10, mnist, gtsrb, fgvc_aircraft, caltech101, eurosat,
# resisc45, dmlab, country211, ...), and a TFDS config or version is dropped
# before looking up ("eurosat/rgb", "sun397/tfds", "imagenet2012:5.1.0").
# Class names are matched to labels by index, so a name is here only if its
# labels are in the order of CLIP_benchmark's list (checked against TFDS's
# ClassLabel names): the imagenet_* variants all label with imagenet2012's
# 1000 indices. TFDS's stanford_dogs has no CLIP_benchmark set: it falls back.
DATASET_ALIASES = {
    "imagenet": "imagenet1k",
    "imagenet2012": "imagenet1k",
    "imagenet_v2": "imagenet1k",
    "imagenet_sketch": "imagenet1k",
    "imagenet_a": "imagenet1k",
    "imagenet_r": "imagenet1k",
    "oxford_iiit_pet": "pets",
    "oxford_flowers102": "flowers",
    "cars196": "cars",
    "svhn_cropped": "svhn",
    "patch_camelyon": "pcam",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
}

# Where the class-name list to use is not the templates' key: TFDS's
# caltech101 labels are alphabetical ("accordion", "airplanes", ...), the
# order of CLIP_benchmark's "caltech101_vtab" list; its "caltech101" list has
# another order. Checked before the exact key, since benchmark names are TFDS's.
_CLASSNAME_KEYS = {"caltech101": "caltech101_vtab"}


def _load_json(filename: str) -> dict:
  text = (resources.files("multimodal.data") / "third_party" / filename).read_text(
      encoding="utf-8")
  return json.loads(text)


def _to_format_string(template: str) -> str:
  """CLIP_benchmark's "{c}" placeholder as str.format's "{}", with any other
  brace escaped so that it survives formatting literally."""
  parts = template.split("{c}")
  return "{}".join(p.replace("{", "{{").replace("}", "}}") for p in parts)


@functools.cache
def _benchmark_templates() -> dict[str, tuple[str, ...]]:
  return {key: tuple(_to_format_string(t) for t in templates)
          for key, templates in _load_json(_TEMPLATES_FILE).items()}


@functools.cache
def _benchmark_classnames() -> dict[str, tuple[str, ...]]:
  return {key: tuple(names) for key, names in _load_json(_CLASSNAMES_FILE).items()}


def _normalise(dataset: str) -> str:
  name = dataset.strip().lower().split(":", 1)[0].split("/", 1)[0]
  return DATASET_ALIASES.get(name, name)


def _lookup(dataset: str, table: dict):
  if dataset in table:
    return table[dataset]
  return table.get(_normalise(dataset))


def get(name: str) -> tuple[str, ...]:
  """A template set by name: this file's, "imagenet" or a CLIP_benchmark key."""
  if name in TEMPLATES:
    return TEMPLATES[name]
  benchmark = _benchmark_templates()
  key = DATASET_ALIASES["imagenet"] if name == "imagenet" else name
  if key in benchmark:
    return benchmark[key]
  known = sorted({*TEMPLATES, "imagenet", *benchmark})
  raise ValueError(f"unknown template set '{name}'; known sets: {known}.")


def for_dataset(dataset: str) -> tuple[str, ...]:
  """CLIP_benchmark's templates for a benchmark dataset (exact key, else the
  TFDS name normalised), else the "simple" set."""
  templates = _lookup(dataset, _benchmark_templates())
  return templates if templates is not None else TEMPLATES[FALLBACK]


def classnames(dataset: str) -> list[str] | None:
  """CLIP_benchmark's curated class names for a benchmark dataset, in its
  label order, or None where it has none (e.g. cifar10, cars196, dtd: there
  the dataset's own names are the ones to use)."""
  table = _benchmark_classnames()
  key = _CLASSNAME_KEYS.get(_normalise(dataset))
  names = table[key] if key else _lookup(dataset, table)
  return list(names) if names is not None else None


def read_classnames_file(path) -> list[str]:
  """A user's class names, in label order: a .json list of strings, or text
  with one name per line (blank lines ignored)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read classnames file {path}: {e}") from e
  if path.lower().endswith(".json"):
    try:
      names = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"classnames file {path} is not valid JSON: {e}") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f"classnames file {path} must hold a JSON list of strings.")
  else:
    names = [line.strip() for line in text.splitlines() if line.strip()]
  if not names:
    raise ValueError(f"classnames file {path} has no class names.")
  return names
