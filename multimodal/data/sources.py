"""Where examples come from: a TFDS dataset (the shapes world is one),
TFRecord shards in img2dataset's layout, or plain files (`folder:PATH`,
`captions:PATH`; see files.py). Every source yields raw examples with the
image still encoded, so decoding happens in the pp chain where a corrupt
record can be reported clearly.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from multimodal.data import errors, files as files_lib, templates

SHAPES_WORLD = "shapes_world"
TFRECORD_PREFIX = "tfrecord:"


def default_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


@dataclasses.dataclass
class Source:
  """One dataset, split across processes by contiguous shards of each split."""
  name: str
  data_dir: str
  builder: tfds.core.DatasetBuilder | None = None
  files: tuple[str, ...] = ()
  # For plain-file sources: split name (None: any) -> its Listing.
  listing: Callable[[str | None], files_lib.Listing] | None = None

  def num_examples(self, split: str) -> int:
    if self.listing is not None:
      return len(self.listing(split))
    if self.builder is None:
      raise errors.DataError(
          f"{self.name} has no split sizes; give the duration as total_steps.")
    self._check_split(split)
    return self.builder.info.splits[split].num_examples

  def class_names(self, feature_path: str) -> list[str]:
    """Names of a ClassLabel feature, e.g. "objects/shape" (a folder
    dataset has one: its class subfolders, whatever the path)."""
    if self.listing is not None:
      names = self.listing(None).class_names
      if not names:
        raise errors.DataError(f"{self.name} has captions, not class labels.")
      return list(names)
    feature = self.builder.info.features
    for part in feature_path.split("/"):
      feature = feature[part]
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel).
    return list(feature.names)

  def read(self, split: str, *, process_index: int = 0,
           process_count: int = 1) -> tf.data.Dataset:
    """This process's share of `split`, in a fixed order."""
    if self.listing is not None:
      return _listing_dataset(self.listing(split), process_index, process_count)
    if self.builder is None:
      files = self.files[process_index::process_count]
      if files:
        ds = tf.data.TFRecordDataset(list(files))
      else:  # Fewer files than readers: each reads every n-th record of all.
        ds = tf.data.TFRecordDataset(list(self.files)).shard(
            process_count, process_index)
      return ds.map(_parse_img2dataset_record)
    self._check_split(split)
    share = tfds.even_splits(split, n=process_count, drop_remainder=True)
    return self.builder.as_dataset(
        split=share[process_index], shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1))

  def _check_split(self, split: str):
    base = split.split("[")[0]
    if base not in self.builder.info.splits:
      raise errors.DataError(
          f"dataset {self.name} has no split '{base}'; its splits are "
          f"{sorted(self.builder.info.splits)}.")


def _parse_img2dataset_record(record):
  # img2dataset's tfrecord writer stores the image as "jpg" and caption as "txt".
  parsed = tf.io.parse_single_example(record, {
      "jpg": tf.io.FixedLenFeature([], tf.string),
      "txt": tf.io.FixedLenFeature([], tf.string, default_value=""),
  })
  return {"image": parsed["jpg"], "captions": tf.reshape(parsed["txt"], [1])}


def _listing_dataset(listing: files_lib.Listing, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  """Raw examples {image: bytes, file, label | captions} of a Listing.

  Each process reads an equal contiguous share (the remainder is dropped, as
  tfds.even_splits(drop_remainder=True) does for TFDS sources).
  """
  share = len(listing) // process_count
  if share == 0:
    raise errors.DataError(
        f"{len(listing)} images cannot feed {process_count} processes.")
  rows = slice(process_index * share, (process_index + 1) * share)
  columns = {"file": list(listing.files[rows])}
  if listing.labels:
    columns["label"] = list(listing.labels[rows])
  if listing.captions:
    columns["captions"] = tf.ragged.constant(
        [list(c) for c in listing.captions[rows]], dtype=tf.string)
  ds = tf.data.Dataset.from_tensor_slices(columns)
  return ds.map(lambda ex: {**ex, "image": tf.io.read_file(ex["file"])})


def _folder_listing(root: str) -> Callable[[str | None], files_lib.Listing]:
  """Class folders as image-text pairs too: each image's captions are its
  class name in the 80 ImageNet prompt templates (one is drawn per step by
  the pp's `choice`), so `folder:PATH` trains a CLIP as well as it evaluates."""

  @functools.cache
  def listing(split):
    folder = files_lib.read_folder(root, split)
    return dataclasses.replace(folder, captions=tuple(
        tuple(t.format(folder.class_names[label]) for t in templates.get("imagenet"))
        for label in folder.labels))
  return listing


def _captions_listing(path: str) -> Callable[[str | None], files_lib.Listing]:
  return functools.cache(lambda split: files_lib.read_captions(path, split))


def open_source(data: str, *, data_dir: str | None = None,
                shapes_world: dict | None = None) -> Source:
  """Resolves `config.input.data` to a Source, preparing the shapes world."""
  data_dir = default_data_dir(data_dir)
  for prefix, make_listing in ((files_lib.FOLDER_PREFIX, _folder_listing),
                               (files_lib.CAPTIONS_PREFIX, _captions_listing)):
    if data.startswith(prefix):
      path = os.path.abspath(os.path.expanduser(data[len(prefix):]))
      listing = make_listing(path)
      listing(None)  # Fails now, with the reason, if the files are not there.
      return Source(name=f"{prefix}{path}", data_dir=data_dir, listing=listing)
  if data.startswith(TFRECORD_PREFIX):
    pattern = os.path.expanduser(data[len(TFRECORD_PREFIX):])
    files = tuple(sorted(glob.glob(pattern)))
    if not files:
      raise errors.DataError(
          f"no TFRecord shards match '{pattern}'. Write img2dataset output with "
          "--output_format tfrecord and point input.data at "
          "'tfrecord:/path/to/*.tfrecord'.")
    return Source(name=data, data_dir=data_dir, files=files)
  if data == SHAPES_WORLD:
    from multimodal.data import shapes_builder  # Registers the builder.
    builder = shapes_builder.prepare(data_dir, **(shapes_world or {}))
    return Source(name=data, data_dir=data_dir, builder=builder)
  try:
    builder = tfds.builder(data, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for an unknown name.
    raise errors.DataError(
        f"unknown dataset '{data}': {e}. Use 'shapes_world', a TFDS name, "
        "'tfrecord:/path/*.tfrecord', 'folder:/path' (class subfolders) or "
        "'captions:/path/file.tsv' (image<TAB>caption lines).") from None
  if not builder.is_prepared():
    raise errors.DataError(
        f"dataset '{data}' is not prepared in data_dir '{data_dir}'. Nothing is "
        "downloaded at run time: prepare it on a machine with the files with "
        f"`tfds build {data} --data_dir {data_dir}` (manual downloads go in "
        f"{data_dir}/downloads/manual), or set --config.input.data_dir to where "
        "it is prepared.")
  return Source(name=data, data_dir=data_dir, builder=builder)
