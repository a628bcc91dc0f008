"""Benchmark datasets by name, each a Source plus what a benchmark needs:

  <tfds name>             an image classification dataset (a ClassLabel
                          feature) or a captioning dataset (a Text feature,
                          e.g. coco_captions) prepared in the data_dir;
  folder:PATH             class subfolders, for classification;
  captions:PATH           image<TAB>caption lines or a Karpathy JSON, for retrieval;
  shapes_world/shape, shapes_world/colour   zero-shot on single-object scenes;
  shapes_world/retrieval  all scenes with all their captions.

Test splits are "test" where the dataset has one, else "validation". TFDS's
coco_captions splits are Karpathy's (its test split is the 5k Karpathy
test images), and a Karpathy JSON given as captions:PATH is read the same way.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from multimodal.data import errors, files, pipeline, sources, templates as templates_lib

SHAPES_PREFIX = "shapes_world/"
SHAPES_BENCHMARKS = ("shape", "colour", "retrieval")
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"


@dataclasses.dataclass
class Benchmark:
  """One dataset as a benchmark: where its images are and what they mean.

  `read(split)` gives every raw example of the split ({"image": bytes, ...})
  in a fixed order; classification examples carry "label" after
  `label_pp` (a pp spec, or None when the raw example already has it).
  """
  name: str
  kind: str
  source: sources.Source
  test_split: str | None
  class_names: list[str] | None = None
  templates: tuple[str, ...] = ()
  label_pp: str | None = None
  filter_fn: Callable | None = None
  captions_fn: Callable | None = None  # raw example -> its captions tensor

  def read(self, split: str | None) -> tf.data.Dataset:
    ds = self.source.read(split)
    return ds.filter(self.filter_fn) if self.filter_fn is not None else ds

  def num_examples(self, split: str | None) -> int | None:
    """The split's size when known without reading it."""
    if self.filter_fn is not None:
      return None
    try:
      return self.source.num_examples(split)
    except errors.DataError:
      return None

  def has_split(self, split: str) -> bool:
    if self.source.builder is not None:
      return split.split("[")[0] in self.source.builder.info.splits
    if self.source.name.startswith(files.FOLDER_PREFIX):
      return split in files.folder_splits(self.source.name[len(files.FOLDER_PREFIX):])
    return False

  def captions(self, split: str | None) -> list[list[str]]:
    """Every example's captions, in `read(split)` order, without decoding images."""
    ds = self.read(split).map(lambda ex: self.captions_fn(ex))
    return [[c.decode("utf-8") for c in np.atleast_1d(row)]
            for row in ds.as_numpy_iterator()]


def _default_test_split(splits) -> str:
  for name in ("test", "validation", "val"):
    if name in splits:
      return name
  raise errors.DataError(f"no test or validation split among {sorted(splits)}; "
                         "pass --split to choose one.")


def _feature_names(features, kind) -> list[str]:
  return [k for k, f in features.items() if isinstance(f, kind)]


def _tfds_benchmark(name: str, source: sources.Source) -> Benchmark:
  info = source.builder.info
  features = info.features
  images = _feature_names(features, tfds.features.Image)
  if "image" not in images:
    raise errors.DataError(
        f"TFDS dataset {name} has no 'image' feature (its features: "
        f"{sorted(features)}); benchmarks read images from 'image'.")
  test_split = _default_test_split(info.splits)
  labels = _feature_names(features, tfds.features.ClassLabel)
  if labels:
    key = "label" if "label" in labels else labels[0]
    tfds_names = [n.replace("_", " ") for n in features[key].names]
    # CLIP_benchmark's curated names where it has them: TFDS's imagenet2012
    # labels are WordNet ids ("n01440764"), which no text tower can read.
    curated = templates_lib.classnames(name)
    names = curated if curated and len(curated) == len(tfds_names) else tfds_names
    label_pp = None if key == "label" else f'copy("{key}", "label")'
    return Benchmark(name, CLASSIFICATION, source, test_split, names,
                     templates_lib.for_dataset(name), label_pp=label_pp)
  captions_fn = _tfds_captions_fn(features)
  if captions_fn is None:
    raise errors.DataError(
        f"TFDS dataset {name} has neither a ClassLabel feature (classification) "
        f"nor captions (retrieval); its features: {sorted(features)}.")
  return Benchmark(name, RETRIEVAL, source, test_split, captions_fn=captions_fn)


def _tfds_captions_fn(features):
  """coco_captions: captions/text in a Sequence of dicts; others: a Text or
  Sequence(Text) feature named captions, caption or text."""
  for key in ("captions", "caption", "text"):
    if key not in features.keys():
      continue
    inner = getattr(features[key], "feature", features[key])
    if isinstance(inner, tfds.features.FeaturesDict) and "text" in inner:
      return lambda ex, key=key: ex[key]["text"]
    if isinstance(inner, tfds.features.Text):
      return lambda ex, key=key: tf.reshape(ex[key], [-1])
  return None


def _shapes_benchmark(name: str, data_dir, shapes_world: dict | None) -> Benchmark:
  which = name[len(SHAPES_PREFIX):]
  if which not in SHAPES_BENCHMARKS:
    raise errors.DataError(
        f"unknown shapes-world benchmark '{name}'; known: "
        f"{', '.join(SHAPES_PREFIX + b for b in SHAPES_BENCHMARKS)}.")
  source = sources.open_source(sources.SHAPES_WORLD, data_dir=data_dir,
                               shapes_world=shapes_world)
  if which == "retrieval":
    return Benchmark(name, RETRIEVAL, source, "test",
                     captions_fn=lambda ex: ex["captions"])
  return Benchmark(
      name, CLASSIFICATION, source, "test",
      source.class_names(f"objects/{which}"), templates_lib.get(f"shapes_{which}"),
      label_pp=f'object_label("{which}")', filter_fn=pipeline.is_single_object)


def _file_benchmark(name: str, data_dir) -> Benchmark:
  source = sources.open_source(name, data_dir=data_dir)
  if name.startswith(files.CAPTIONS_PREFIX):
    path = name[len(files.CAPTIONS_PREFIX):]
    split = "test" if path.endswith(".json") else None
    return Benchmark(name, RETRIEVAL, source, split,
                     captions_fn=lambda ex: ex["captions"])
  splits = files.folder_splits(name[len(files.FOLDER_PREFIX):])
  test_split = _default_test_split(splits) if splits else None
  return Benchmark(name, CLASSIFICATION, source, test_split,
                   source.class_names(""),
                   templates_lib.for_dataset(name))


def resolve(name: str, *, data_dir: str | None = None,
            shapes_world: dict | None = None,
            class_names: list[str] | None = None) -> Benchmark:
  """The benchmark a --benchmarks entry names. `class_names` (from a
  classnames file) replaces the dataset's own for classification."""
  if name.startswith(SHAPES_PREFIX):
    bench = _shapes_benchmark(name, data_dir, shapes_world)
  elif name.startswith((files.FOLDER_PREFIX, files.CAPTIONS_PREFIX)):
    bench = _file_benchmark(name, data_dir)
  else:
    bench = _tfds_benchmark(name, sources.open_source(name, data_dir=data_dir))
  if bench.kind == CLASSIFICATION and class_names is not None:
    if len(class_names) != len(bench.class_names):
      raise errors.DataError(
          f"the classnames file has {len(class_names)} names but {name} has "
          f"{len(bench.class_names)} classes.")
    bench.class_names = list(class_names)
  return bench
