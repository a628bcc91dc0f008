"""Plain files as datasets, with no TFDS builder to write:

  folder:PATH     images in class subfolders (PATH/<class>/<image>), the class
                  name being the subfolder's name with "_" read as a space.
                  Split subfolders (PATH/train/<class>/..., PATH/test/...) are
                  used when present; otherwise the folder is one split that
                  every split name reads.
  captions:PATH   a text file of `image_path<TAB>caption` lines (paths relative
                  to the file's folder; an image on several lines has several
                  captions), or a Karpathy-split JSON (dataset_coco.json,
                  dataset_flickr30k.json: images[].filepath/filename/split/
                  sentences[].raw), whose `split` field gives the splits.

Each becomes a `Listing` (file paths plus labels or captions), which
`sources.py` turns into the same raw-example stream a TFDS dataset gives.
"""
from __future__ import annotations

import dataclasses
import json
import os

from multimodal.data import errors

FOLDER_PREFIX = "folder:"
CAPTIONS_PREFIX = "captions:"
# What tf.io.decode_image reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Split name -> the subfolder names that hold it.
SPLIT_FOLDERS = {"train": ("train",), "test": ("test",),
                 "validation": ("validation", "val", "valid")}


@dataclasses.dataclass(frozen=True)
class Listing:
  """One split of a file dataset: image paths with labels or captions."""
  files: tuple[str, ...]
  captions: tuple[tuple[str, ...], ...] = ()
  labels: tuple[int, ...] = ()
  class_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.files)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir()
                and not e.name.startswith("."))


def folder_splits(root: str) -> dict[str, str]:
  """{split name: its subfolder} for the split subfolders `root` has."""
  present = set(_subfolders(root))
  splits = {}
  for split, names in SPLIT_FOLDERS.items():
    for name in names:
      if name in present:
        splits[split] = os.path.join(root, name)
        break
  return splits


def read_folder(root: str, split: str | None = None) -> Listing:
  """The images of `root` (or of its `split` subfolder), labelled by class.

  Class ids index the sorted union of class folders over all splits, so a
  class missing from one split keeps its id in the others.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise errors.DataError(
        f"folder:{root} is not a directory. A folder dataset holds one "
        "subfolder per class (PATH/<class name>/<image files>).")
  splits = folder_splits(root)
  if splits and split is not None and split not in splits:
    raise errors.DataError(
        f"folder:{root} has split subfolders {sorted(splits)} but no '{split}'; "
        f"add {root}/{SPLIT_FOLDERS.get(split, (split,))[0]}/, or use one of "
        "those splits.")
  if splits:
    classes = sorted({c for path in splits.values() for c in _subfolders(path)})
    where = splits[split] if split is not None else next(iter(splits.values()))
  else:
    classes, where = _subfolders(root), root
  if not classes:
    raise errors.DataError(
        f"folder:{root} has no class subfolders. Put each class's images in "
        f"{root}/<class name>/ (an underscore in the name reads as a space).")
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(where, name)
    if not os.path.isdir(class_dir):
      continue
    for entry in sorted(os.listdir(class_dir)):
      if _is_image(entry):
        files.append(os.path.join(class_dir, entry))
        labels.append(label)
  if not files:
    raise errors.DataError(
        f"folder:{where} holds no images with extensions {IMAGE_EXTENSIONS} in "
        "its class subfolders.")
  return Listing(files=tuple(files), labels=tuple(labels),
                 class_names=tuple(c.replace("_", " ") for c in classes))


def read_captions(path: str, split: str | None = None) -> Listing:
  """Images with their captions, from a TSV file or a Karpathy-split JSON."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise errors.DataError(
        f"captions:{path} does not exist. Give a file of "
        "`image_path<TAB>caption` lines, or a Karpathy-split JSON.")
  if path.endswith(".json"):
    listing = _read_karpathy_json(path, split)
  else:
    listing = _read_tsv(path)
  missing = [f for f in listing.files if not os.path.isfile(f)]
  if missing:
    raise errors.DataError(
        f"captions:{path} names {len(missing)} image file(s) that do not exist, "
        f"e.g. {missing[0]}. Paths are relative to the captions file's folder.")
  return listing


def _read_tsv(path: str) -> Listing:
  folder = os.path.dirname(path)
  captions: dict[str, list[str]] = {}  # Insertion order: first appearance.
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      image, tab, caption = line.partition("\t")
      if not tab or not image.strip() or not caption.strip():
        raise errors.DataError(
            f"{path}:{number}: expected `image_path<TAB>caption`, got {line[:80]!r}.")
      image = os.path.join(folder, os.path.expanduser(image.strip()))
      captions.setdefault(image, []).append(caption.strip())
  if not captions:
    raise errors.DataError(f"captions file {path} has no `image_path<TAB>caption` lines.")
  return Listing(files=tuple(captions),
                 captions=tuple(tuple(c) for c in captions.values()))


def _read_karpathy_json(path: str, split: str | None) -> Listing:
  folder = os.path.dirname(path)
  try:
    with open(path, encoding="utf-8") as f:
      images = json.load(f)["images"]
    entries = [(e.get("split"), os.path.join(folder, e.get("filepath", ""), e["filename"]),
                tuple(s["raw"].strip() for s in e["sentences"])) for e in images]
  except (ValueError, KeyError, TypeError) as e:
    raise errors.DataError(
        f"{path} is not a Karpathy-split JSON ({type(e).__name__}: {e}); expected "
        '{"images": [{"filename", "filepath" (optional), "split", '
        '"sentences": [{"raw"}]}]}.') from None
  splits = sorted({s for s, _, _ in entries if s})
  # Karpathy's "restval" images are training images in every paper that uses it.
  wanted = {"train": ("train", "restval"), "validation": ("val",)}.get(
      split, (split,)) if split else None
  kept = [(f, c) for s, f, c in entries if wanted is None or s in wanted]
  if not kept:
    raise errors.DataError(f"{path} has no images in split '{split}'; its splits "
                           f"are {splits}.")
  return Listing(files=tuple(f for f, _ in kept), captions=tuple(c for _, c in kept))
