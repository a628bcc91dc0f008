"""The shapes world: generation invariants and the TFDS builder round trip."""
import collections
import os
import time

import numpy as np
import pytest

from multimodal.data import shapes_world as sw

EVAL_SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def train_examples():
  return [sw.generate_example(0, "train", i) for i in range(2000)]


def _objects(example):
  o = example["objects"]
  return list(zip(o["shape"], o["colour"], o["size"], o["position"], o["bbox"]))


@pytest.mark.unit
def test_constants():
  assert len(sw.SHAPES) == len(sw.COLOURS) == 8
  assert len(sw.POSITIONS) == 9 and sw.SIZES == ("small", "large")
  assert len(set(sw.COLOUR_RGB.values())) == 8
  assert sorted(s for s, _ in sw.NOVEL_PAIRS) == sorted(sw.SHAPES)
  assert sorted(c for _, c in sw.NOVEL_PAIRS) == sorted(sw.COLOURS)


@pytest.mark.unit
def test_deterministic_per_index():
  a = sw.generate_example(3, "train", 17)
  b = sw.generate_example(3, "train", 17)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["captions"] == b["captions"] and a["questions"] == b["questions"]
  c = sw.generate_example(3, "train", 18)
  d = sw.generate_example(3, "validation", 17)
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["image"], d["image"])


@pytest.mark.unit
def test_example_structure(train_examples):
  counts = collections.Counter()
  for ex in train_examples[:300]:
    n = ex["num_objects"]
    assert 1 <= n <= 3
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert len(ex["captions"]) == 3 and len(set(ex["captions"])) == 3
    assert 4 <= len(ex["questions"]) == len(ex["answers"]) <= 6
    assert len(set(ex["objects"]["position"])) == n  # Distinct cells.
    counts[n] += 1
  assert set(counts) == {1, 2, 3}


@pytest.mark.unit
def test_novel_pairs_held_out(train_examples):
  novel = set(sw.NOVEL_PAIRS)
  for split in EVAL_SPLITS:
    examples = train_examples if split == "train" else [
        sw.generate_example(0, split, i) for i in range(500)]
    for ex in examples:
      for shape, colour, *_ in _objects(ex):
        assert (shape, colour) not in novel, (split, shape, colour)
  num_single = 0
  for i in range(500):
    ex = sw.generate_example(0, "test_novel", i)
    assert any((s, c) in novel for s, c, *_ in _objects(ex))
    num_single += ex["num_objects"] == 1
  assert num_single > 0


@pytest.mark.unit
def test_every_shape_and_colour_in_train(train_examples):
  seen = [(s, c) for ex in train_examples for s, c, *_ in _objects(ex)]
  assert {s for s, _ in seen} == set(sw.SHAPES)
  assert {c for _, c in seen} == set(sw.COLOURS)
  assert len(set(seen)) == 64 - 8


@pytest.mark.unit
def test_captions_name_every_object(train_examples):
  templates = set()
  details = collections.Counter()
  for ex in train_examples:
    for caption in ex["captions"]:
      words = caption.replace(",", " ").replace(".", " ").replace(":", " ").split()
      named = set()
      for shape, colour, *_ in _objects(ex):
        if f"{colour} {shape}" in caption:
          named.add("colour and shape")
        elif shape in words and not any(c in words for c in sw.COLOURS):
          named.add("shape")
        elif f"{colour} shape" in caption and not any(s in words for s in sw.SHAPES):
          named.add("colour")
        else:
          raise AssertionError(f"{caption!r} does not name the {colour} {shape}")
      assert len(named) == 1, caption  # One level of detail per caption.
      details.update(named)
      templates.add(caption.split(" ")[0])
  assert len(templates) >= 6  # Varied wording, not one template.
  total = sum(details.values())
  for detail, p in sw.DETAIL_PROBABILITIES.items():
    assert abs(details[detail] / total - p) < 0.05, details


@pytest.mark.unit
def test_answers_agree_with_objects(train_examples):
  yes_no = collections.Counter()
  for ex in train_examples:
    objects = _objects(ex)
    for q, a in zip(ex["questions"], ex["answers"]):
      words = q.rstrip("?").split(" ")
      if q == "how many objects are there?":
        assert a == sw.NUMBER_WORDS[len(objects)]
      elif q.startswith("what colour is the "):
        (match,) = [o for o in objects if o[0] == words[-1]]
        assert a == match[1]
      elif q.startswith("what shape is the "):
        (match,) = [o for o in objects if o[1] == words[-2]]
        assert a == match[0]
      elif q.startswith("is there "):
        colour, shape = words[-2:]
        present = any(o[:2] == (shape, colour) for o in objects)
        assert a == ("yes" if present else "no")
        assert (shape, colour) not in sw.NOVEL_PAIRS
        yes_no[a] += 1
      elif q.startswith(("where is the ", "what size is the ")):
        colour, shape = words[-2:]
        (match,) = [o for o in objects if o[:2] == (shape, colour)]
        assert a == (match[3] if q.startswith("where") else match[2])
      else:
        raise AssertionError(f"unexpected question {q!r}")
  total = yes_no["yes"] + yes_no["no"]
  assert total > 1000 and abs(yes_no["yes"] / total - 0.5) < 0.03


@pytest.mark.unit
@pytest.mark.parametrize("image_size", [64, 32])
def test_boxes_cover_drawn_pixels(image_size):
  checked = 0
  for i in range(200):
    ex = sw.generate_example(1, "train", i, image_size)
    boxes = np.asarray(ex["objects"]["bbox"])
    assert boxes.shape == (ex["num_objects"], 4)
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    if ex["num_objects"] != 1:
      continue
    image = ex["image"].astype(np.float32)
    background = np.median(image.reshape(-1, 3), axis=0)
    drawn = np.abs(image - background).max(-1) > 40
    ys, xs = np.nonzero(drawn)
    assert len(ys) > 0
    y0, x0, y1, x1 = boxes[0] * image_size
    assert ys.min() >= y0 and ys.max() + 1 <= y1
    assert xs.min() >= x0 and xs.max() + 1 <= x1
    # Tight: the drawn pixels reach (close to) every edge of the box.
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    checked += 1
  assert checked > 30


@pytest.mark.unit
def test_large_objects_are_larger():
  for size in (32, 64):
    small, _ = sw.shape_mask("circle", "small", size)
    large, _ = sw.shape_mask("circle", "large", size)
    assert large.sum() > 1.8 * small.sum()


@pytest.mark.unit
def test_png_bytes_round_trip():
  from PIL import Image
  import io
  image = sw.generate_example(0, "train", 5, 32)["image"]
  decoded = np.asarray(Image.open(io.BytesIO(sw.png_bytes(image))))
  np.testing.assert_array_equal(decoded, image)


@pytest.mark.unit
def test_tfds_build_load_and_reuse(tmp_path):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from multimodal.data import shapes_builder

  data_dir = str(tmp_path)
  kwargs = dict(image_size=32, train_examples=200, eval_examples=50, seed=0)
  builder = shapes_builder.prepare(data_dir, **kwargs)
  assert builder.builder_config.name == "s32_n200_e50_seed0"
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {"train": 200, "validation": 50, "test": 50, "test_novel": 50}

  ds = builder.as_dataset(split="train", shuffle_files=False)
  examples = list(ds.take(3).as_numpy_iterator())
  first = examples[0]
  assert first["image"].shape == (32, 32, 3) and first["image"].dtype == np.uint8
  assert first["num_objects"].dtype == np.int32
  assert first["captions"].shape == (3,) and first["captions"].dtype == object
  n = first["num_objects"]
  assert first["objects"]["bbox"].shape == (n, 4)
  assert first["objects"]["bbox"].dtype == np.float32
  for key in ("shape", "colour", "size", "position"):
    assert first["objects"][key].shape == (n,)
  assert len(first["questions"]) == len(first["answers"])
  # Records are written in index order and match the generator exactly.
  expected = sw.generate_example(0, "train", 0, 32)
  np.testing.assert_array_equal(first["image"], expected["image"])
  assert [c.decode() for c in first["captions"]] == expected["captions"]
  shapes = builder.info.features["objects"]["shape"]
  assert [shapes.int2str(s) for s in first["objects"]["shape"]] == (
      expected["objects"]["shape"])
  assert ds.element_spec["image"].dtype == tf.uint8

  # Loading by name works too, and a second prepare does not regenerate.
  by_name = tfds.builder("shapes_world/s32_n200_e50_seed0", data_dir=data_dir)
  assert by_name.info.splits["test_novel"].num_examples == 50
  files = {p: os.stat(p).st_mtime_ns
           for p in tmp_path.rglob("*") if p.is_file()}
  start = time.time()
  again = shapes_builder.prepare(data_dir, **kwargs)
  assert time.time() - start < 5
  assert again.data_dir == builder.data_dir
  assert files == {p: os.stat(p).st_mtime_ns
                   for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_processes_preparing_the_same_world_at_once_all_get_it(tmp_path):
  """What the processes of a multi-process job do on a fresh data_dir: they
  call prepare at the same moment (each, once imported, says it is ready and
  waits for a start file), and all of them get the one dataset, generated once."""
  import subprocess
  import sys
  from conftest import ROOT
  go = tmp_path / "go"
  script = (
      "import os, sys, time\n"
      "from multimodal.data import shapes_builder\n"
      f"open(os.path.join({str(tmp_path)!r}, 'ready_' + sys.argv[1]), 'w').close()\n"
      f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
      f"b = shapes_builder.prepare({str(tmp_path / 'tfds')!r}, image_size=32, "
      "train_examples=1500, eval_examples=50)\n"
      "print(b.info.splits['train'].num_examples)\n")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(3)]
  deadline = time.time() + 300
  while len(list(tmp_path.glob("ready_*"))) < len(procs):
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
    assert time.time() < deadline
    time.sleep(0.05)
  go.touch()
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "1500"
  # Generated once: the others found it ready when the lock let them in.
  assert sum("shapes_world: prepared" in out for out, _ in outputs) == 1


@pytest.mark.unit
def test_unprepared_config_by_name(tmp_path):
  import tensorflow_datasets as tfds
  from multimodal.data import shapes_builder

  builder = tfds.builder("shapes_world/s48_n10_e5_seed3", data_dir=str(tmp_path))
  assert isinstance(builder, shapes_builder.ShapesWorld)
  cfg = builder.builder_config
  assert (cfg.image_size, cfg.train_examples, cfg.eval_examples, cfg.seed) == (
      48, 10, 5, 3)
  assert not builder.is_prepared()
  assert builder.info.features["image"].shape == (48, 48, 3)


@pytest.mark.unit
def test_object_counts_follow_their_distribution(train_examples):
  counts = collections.Counter(ex["num_objects"] for ex in train_examples)
  total = sum(counts.values())
  assert set(counts) == {1, 2, 3}
  for n, p in zip((1, 2, 3), sw.NUM_OBJECTS_PROBABILITIES):
    assert abs(counts[n] / total - p) < 0.06, counts


# The fingerprint of what version VERSION of the builder generates. A prepared
# dataset is reused by version, so changing the generator without bumping the
# version would silently serve stale data from every existing data_dir.
FINGERPRINTS = {
    "1.3.0": "0afb08f693ed27eaae2bce0285147f612e9855c4d5f8571916f7f1f040750f48",
}


@pytest.mark.unit
def test_generator_changes_bump_the_dataset_version():
  import hashlib
  from multimodal.data import shapes_builder
  digest = hashlib.sha256()
  for split in sw.SPLITS:
    for i in range(20):
      ex = sw.generate_example(0, split, i)
      digest.update(ex["image"].tobytes())
      for text in ex["captions"] + ex["questions"] + ex["answers"]:
        digest.update(text.encode())
  version = str(shapes_builder.ShapesWorld.VERSION)
  assert FINGERPRINTS.get(version) == digest.hexdigest(), (
      f"shapes_world.py now generates different data than version {version} "
      "did: bump ShapesWorld.VERSION (with a release note) and record the new "
      f"fingerprint {digest.hexdigest()} for it here.")
