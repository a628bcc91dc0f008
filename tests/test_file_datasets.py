"""The plain-file dataset formats, folder:PATH and captions:PATH: listings,
splits, clear errors, the raw-example stream, and training a CLIP on them."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_clip_config
from multimodal.data import errors, files, sources

pytestmark = pytest.mark.unit


def write_png(path, colour, size=(20, 16)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path)
  return str(path)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def make_folder(root, classes=("red_thing", "green_thing"), per_class=3, split=None):
  base = root / split if split else root
  for c in classes:
    for i in range(per_class):
      write_png(base / c / f"{i}.png", COLOURS[c.split("_")[0]])
  (base / classes[0] / "notes.txt").write_text("not an image")
  return str(root)


def test_folder_without_splits(tmp_path):
  make_folder(tmp_path)
  listing = files.read_folder(str(tmp_path))
  assert listing.class_names == ("green thing", "red thing")  # Sorted; "_" -> " ".
  assert len(listing) == 6 and listing.labels == (0, 0, 0, 1, 1, 1)
  assert all(f.endswith(".png") for f in listing.files)
  # One split that every split name reads.
  assert files.read_folder(str(tmp_path), "test") == listing


def test_folder_with_splits_keeps_class_ids(tmp_path):
  make_folder(tmp_path, ("red_thing", "green_thing"), split="train")
  make_folder(tmp_path, ("red_thing", "blue_thing"), per_class=2, split="val")
  assert files.folder_splits(str(tmp_path)) == {
      "train": str(tmp_path / "train"), "validation": str(tmp_path / "val")}
  val = files.read_folder(str(tmp_path), "validation")
  assert val.class_names == ("blue thing", "green thing", "red thing")
  assert sorted(set(val.labels)) == [0, 2]  # Ids index the union of classes.
  with pytest.raises(errors.DataError, match="no 'test'"):
    files.read_folder(str(tmp_path), "test")


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "is not a directory"),
    (lambda p: p.mkdir(), "no class subfolders"),
    (lambda p: (p / "a").mkdir(parents=True), "holds no images"),
])
def test_folder_errors(tmp_path, setup, match):
  path = tmp_path / "data"
  setup(path)
  with pytest.raises(errors.DataError, match=match):
    files.read_folder(str(path))


def test_captions_tsv_groups_captions_by_image(tmp_path):
  a = write_png(tmp_path / "img" / "a.png", COLOURS["red"])
  write_png(tmp_path / "img" / "b.png", COLOURS["blue"])
  (tmp_path / "caps.tsv").write_text(
      "img/a.png\ta red square\n\nimg/b.png\ta blue square\nimg/a.png\tsomething red\n")
  listing = files.read_captions(str(tmp_path / "caps.tsv"))
  assert listing.files == (a, str(tmp_path / "img" / "b.png"))
  assert listing.captions == (("a red square", "something red"), ("a blue square",))


@pytest.mark.parametrize("text, match", [
    ("img/a.png a caption without a tab\n", r"caps.tsv:1: expected"),
    ("img/a.png\tok\nimg/missing.png\tgone\n", "1 image file.*missing.png"),
    ("\n\n", "no `image_path<TAB>caption` lines"),
])
def test_captions_tsv_errors(tmp_path, text, match):
  write_png(tmp_path / "img" / "a.png", COLOURS["red"])
  (tmp_path / "caps.tsv").write_text(text)
  with pytest.raises(errors.DataError, match=match):
    files.read_captions(str(tmp_path / "caps.tsv"))


def test_karpathy_json_splits(tmp_path):
  images = []
  for i, split in enumerate(("train", "restval", "val", "test", "test")):
    write_png(tmp_path / "val2014" / f"{i}.png", COLOURS["red"])
    images.append({"filepath": "val2014", "filename": f"{i}.png", "split": split,
                   "sentences": [{"raw": f"caption {i} a "}, {"raw": f"caption {i} b"}]})
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}))
  test = files.read_captions(str(path), "test")
  assert [f.rsplit("/", 1)[1] for f in test.files] == ["3.png", "4.png"]
  assert test.captions[0] == ("caption 3 a", "caption 3 b")
  # Karpathy's restval images are training images.
  assert len(files.read_captions(str(path), "train")) == 2
  assert len(files.read_captions(str(path), "validation")) == 1
  with pytest.raises(errors.DataError, match="no images in split 'dev'"):
    files.read_captions(str(path), "dev")
  path.write_text(json.dumps({"images": [{"filename": "x.png"}]}))
  with pytest.raises(errors.DataError, match="not a Karpathy-split JSON"):
    files.read_captions(str(path), "test")


def test_folder_source_yields_raw_examples(tmp_path):
  make_folder(tmp_path)
  source = sources.open_source(f"folder:{tmp_path}")
  assert source.num_examples("train") == 6
  assert source.class_names("label") == ["green thing", "red thing"]
  examples = list(source.read("train").as_numpy_iterator())
  assert [int(e["label"]) for e in examples] == [0, 0, 0, 1, 1, 1]
  decoded = np.asarray(Image.open(io.BytesIO(examples[3]["image"])))
  assert decoded.shape == (16, 20, 3) and tuple(decoded[0, 0]) == COLOURS["red"]
  # Captions for training: the class name in the 80 ImageNet templates.
  captions = [c.decode() for c in examples[0]["captions"]]
  assert len(captions) == 80 and all("green thing" in c for c in captions)
  # Each of two processes reads its contiguous half.
  second = list(source.read("train", process_index=1, process_count=2))
  assert [int(e["label"]) for e in second] == [1, 1, 1]


def test_missing_file_dataset_errors(tmp_path):
  with pytest.raises(errors.DataError, match="is not a directory"):
    sources.open_source(f"folder:{tmp_path}/nope")
  with pytest.raises(errors.DataError, match="does not exist"):
    sources.open_source(f"captions:{tmp_path}/nope.tsv")


@pytest.mark.parametrize("kind", ["captions", "folder"])
def test_clip_trains_on_file_datasets(kind, tmp_path, data_dir):
  """`--config.input.data=captions:PATH` or `folder:PATH` feeds the
  unchanged CLIP task and trainer (here a few steps of a tiny model)."""
  from multimodal.tasks import clip
  from multimodal.train import trainer
  if kind == "folder":
    spec = f"folder:{make_folder(tmp_path / 'data', per_class=8)}"
  else:
    lines = []
    for i, (name, colour) in enumerate(sorted(COLOURS.items()) * 6):
      write_png(tmp_path / "img" / f"{i}.png", colour)
      lines.append(f"img/{i}.png\ta {name} picture\nimg/{i}.png\tsomething {name}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    spec = f"captions:{tmp_path}/pairs.tsv"
  config = tiny_clip_config(data_dir, **{"input.data": spec, "input.batch_size": 8,
                                         "total_steps": 4, "ckpt_steps": 4})
  config.evals = {}  # The shapes-world evaluators do not apply.
  task = clip.ContrastiveTask(config)
  summary = trainer.train(task, config, str(tmp_path / "run"))
  assert summary["step"] == 4
  assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
