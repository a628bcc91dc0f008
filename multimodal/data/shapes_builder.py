"""The shapes world as a TFDS dataset, generated locally (nothing is downloaded).

    builder = prepare(data_dir)          # Generates once, then just loads.
    ds = builder.as_dataset(split="train")

Importing this module registers `shapes_world` with TFDS, so
`tfds.builder("shapes_world/s64_n200_e50_seed0", data_dir=...)` works for any
parameters spelled in the config-name format, not only the default config.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from multimodal.data import shapes_world as world

_NAME_RE = re.compile(r"s(\d+)_n(\d+)_e(\d+)_seed(\d+)")


def config_name(image_size: int, train_examples: int, eval_examples: int,
                seed: int) -> str:
  return f"s{image_size}_n{train_examples}_e{eval_examples}_seed{seed}"


class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Generation parameters; the name encodes all of them, so two settings never
  share a directory in one data_dir."""

  def __init__(self, image_size: int = 64, train_examples: int = 50_000,
               eval_examples: int = 2_000, seed: int = 0, **kwargs):
    name = config_name(image_size, train_examples, eval_examples, seed)
    kwargs.setdefault("description", (
        f"{image_size}x{image_size} images, {train_examples} train and "
        f"{eval_examples} per eval split, seed {seed}."))
    super().__init__(name=name, **kwargs)
    self.image_size = image_size
    self.train_examples = train_examples
    self.eval_examples = eval_examples
    self.seed = seed

  @classmethod
  def from_name(cls, name: str) -> "ShapesWorldConfig | None":
    match = _NAME_RE.fullmatch(name)
    return cls(*map(int, match.groups())) if match else None


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes of 1-3 coloured shapes with captions, QA and boxes."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Half of the captions name only the shape or only the colour.",
      "1.2.0": "Half of the scenes hold one object (was a third).",
      "1.3.0": "40% of captions name only the shape (was 30%); positions are "
               "named in 30% of captions (was 50%).",
  }
  BUILDER_CONFIGS = [ShapesWorldConfig()]
  DEFAULT_BUILDER_CONFIG_NAME = BUILDER_CONFIGS[0].name

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default resolves the package via `importlib_resources`,
    # which is not installed (nor needed on Python >= 3.9); the file is known.
    return epath.Path(__file__)

  def _create_builder_config(self, builder_config, version):
    # Any config name in the s{S}_n{N}_e{E}_seed{K} format is valid, and a
    # config object is identified by its name (which encodes every parameter).
    if isinstance(builder_config, ShapesWorldConfig):
      builder_config = builder_config.name
    if isinstance(builder_config, str):
      name = builder_config.split(":")[0]
      if self.get_builder_config(name) is None:
        parsed = ShapesWorldConfig.from_name(name)
        if parsed is not None:
          return parsed
    return super()._create_builder_config(builder_config, version)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3),
                                         encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "objects": tfds.features.Sequence({
                "shape": tfds.features.ClassLabel(names=world.SHAPES),
                "colour": tfds.features.ClassLabel(names=world.COLOURS),
                "size": tfds.features.ClassLabel(names=world.SIZES),
                "position": tfds.features.ClassLabel(names=world.POSITIONS),
                "bbox": tfds.features.BBoxFeature(),
            }),
            "num_objects": np.int32,
            "questions": tfds.features.Sequence(tfds.features.Text()),
            "answers": tfds.features.Sequence(tfds.features.Text()),
        }),
        supervised_keys=None,
        # Record i of a split is generate_example(seed, split, i): examples are
        # i.i.d. already, and a fixed order makes any record easy to trace.
        # Read with shuffle_files=False (TFDS refuses otherwise).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated; there is nothing to download.
    cfg = self.builder_config
    sizes = {"train": cfg.train_examples, "validation": cfg.eval_examples,
             "test": cfg.eval_examples, "test_novel": cfg.eval_examples}
    return {split: self._generate_examples(split, n)
            for split, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int):
    # One process is fast enough (~46 s for the default 56k examples): images
    # are pre-encoded with shapes_world's PNG writer, ~3x faster than TFDS's
    # own. Worker processes were tried and dropped: "spawn" re-imports the
    # caller's __main__, which re-runs any script without a main guard.
    cfg = self.builder_config
    for index in range(num_examples):
      example = world.generate_example(cfg.seed, split, index, cfg.image_size)
      example["image"] = world.png_bytes(example["image"])
      example["num_objects"] = np.int32(example["num_objects"])
      example["objects"]["bbox"] = list(example["objects"]["bbox"])
      yield index, example


@contextlib.contextmanager
def _exclusive(lock_path: str):
  """Holds an exclusive lock on `lock_path` (created if missing) while inside."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(data_dir: str | None = None, *, image_size: int = 64,
            train_examples: int = 50_000, eval_examples: int = 2_000,
            seed: int = 0) -> tfds.core.DatasetBuilder:
  """The builder for these parameters, generating the data only if needed.

  Safe to call from several processes at once (the processes of a multi-process
  job on a fresh data_dir): one generates while the others wait for it, since
  two concurrent generations collide when TFDS renames its output into place.
  """
  data_dir = os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  config = ShapesWorldConfig(image_size, train_examples, eval_examples, seed)
  builder = ShapesWorld(config=config, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  with _exclusive(os.path.join(data_dir, "shapes_world", f".{config.name}.lock")):
    # Another process may have generated it while this one waited.
    builder = ShapesWorld(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      print(f"shapes_world: preparing {config.name} in {builder.data_dir} ...",
            flush=True)
      start = time.time()
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
      print(f"shapes_world: prepared {config.name} in "
            f"{time.time() - start:.1f} s.", flush=True)
  return builder
