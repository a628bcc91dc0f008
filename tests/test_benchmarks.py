"""The zero-shot benchmark suite on generic TFDS datasets and file datasets:
embeddings in split order, the cached text classifier, zero-shot
classification and retrieval against brute force, and the result files in
CLIP_benchmark's schema. Models are tiny and random: these tests check the
plumbing; test_benchmarks_e2e.py evaluates a trained model."""
import csv
import json

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.metrics import balanced_accuracy_score

from multimodal.data import errors, preprocess
from multimodal.eval_suite import datasets, embedding, encoders, results, suite
from multimodal.parallel import sharding

pytestmark = pytest.mark.unit

NAMES = ["red_square", "blue_circle", "green_triangle"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]


def _image(label, i):
  rng = np.random.default_rng(i)
  image = np.full((24, 24, 3), COLOURS[label], np.uint8)
  image[rng.integers(0, 20):, rng.integers(0, 20):] //= 2  # Not all alike.
  return image


class TinyClasses(tfds.core.GeneratorBasedBuilder):
  """An image classification dataset shaped like cifar10 (image, label)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(24, 24, 3)),
        "label": tfds.features.ClassLabel(names=NAMES)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(100, 19)}

  def _generate_examples(self, offset, n):
    for i in range(n):
      yield i, {"image": _image(i % 3, offset + i), "label": i % 3}


# Captions per image vary, as in COCO (5 to 7).
CAPTIONS = [["a red square", "red"], ["a blue circle"], ["a green triangle", "green", "tri"],
            ["a red square again"], ["a blue circle", "blue circle two"]]


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """A captioning dataset shaped like coco_captions (captions/text)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(24, 24, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i, caps in enumerate(CAPTIONS):
      yield i, {"image": _image(i % 3, i), "captions": {"text": caps}}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bench_tfds"))
  for builder in (TinyClasses, TinyCaptions):
    builder(data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="module")
def encoder(clip_task):
  """The tiny CLIP of the session's clip_task with random weights."""
  params = sharding.strip_boxes(clip_task.init(jax.random.key(0)))
  return encoders.Encoder(
      model="clip-tiny", pretrained="/runs/tiny@0", fingerprint="tiny0",
      image_pp="decode|resize(32)|value_range(-1,1)", tokenizer=clip_task.tokenizer,
      max_len=clip_task.max_len, module=clip_task.model, params=params,
      mesh=sharding.make_mesh({"data": -1}))


def direct_embeddings(encoder, images):
  """The model applied to the preprocessed images in one call, no pipeline."""
  pp = preprocess.build(encoder.image_pp)
  x = np.stack([pp({"image": tf.constant(im)})["image"].numpy() for im in images])
  z = encoder.module.apply({"params": jax.device_get(encoder.params)}, x,
                           method=encoder.module.embed_image)[0]
  return np.asarray(z)


def test_embed_split_keeps_order_across_padded_batches(encoder):
  images = [_image(i % 3, i) for i in range(13)]  # Batches of 8: 8 + 5 padded.
  ds = tf.data.Dataset.from_tensor_slices({"image": np.stack(images),
                                           "label": np.arange(13)})
  out, timing = embedding.embed_split(encoder, ds, batch_size=8, keys=("label",))
  np.testing.assert_array_equal(out["label"], np.arange(13))
  np.testing.assert_allclose(out["embedding"], direct_embeddings(encoder, images), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
  assert timing.examples == 13 and 0 <= timing.input_wait_seconds <= timing.seconds
  assert "13 images" in timing.line("x")


def test_text_classifier_is_built_once_and_cached(encoder, tmp_path, monkeypatch):
  calls = []
  real = encoder.embed_texts
  monkeypatch.setattr(encoder, "embed_texts", lambda texts: calls.append(len(texts)) or real(texts))
  names, templates = ["red square", "blue circle"], ("a {}.", "a photo of a {}.")
  first = suite.text_classifier(encoder, names, templates, str(tmp_path))
  assert calls == [4]  # All prompts in one batched call.
  again = suite.text_classifier(encoder, names, templates, str(tmp_path))
  assert calls == [4]  # From the cache.
  np.testing.assert_array_equal(first, again)
  suite.text_classifier(encoder, names, ("a {}!",), str(tmp_path))
  assert calls == [4, 2]  # Other templates: another classifier.
  # The class embedding is the renormalised mean of its prompts' embeddings.
  z = real(["a red square.", "a photo of a red square."])
  mean = z.mean(0) / np.linalg.norm(z.mean(0))
  np.testing.assert_allclose(first[0], mean, atol=1e-5)


def test_zero_shot_classification_on_a_tfds_dataset(encoder, tfds_dir, tmp_path):
  bench = datasets.resolve("tiny_classes", data_dir=tfds_dir)
  assert (bench.kind, bench.test_split) == ("classification", "test")
  assert bench.class_names == [n.replace("_", " ") for n in NAMES]
  got, _ = suite.zeroshot_classification(encoder, bench, split="test", batch_size=8,
                                         cache_dir=str(tmp_path))
  # Brute force from the images as TFDS decodes them.
  examples = list(tfds.builder("tiny_classes", data_dir=tfds_dir)
                  .as_dataset(split="test").as_numpy_iterator())
  labels = np.array([e["label"] for e in examples])
  classifier = suite.text_classifier(encoder, bench.class_names, bench.templates, None)
  logits = direct_embeddings(encoder, [e["image"] for e in examples]) @ classifier.T
  assert got["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert got["acc5"] == 1.0  # Top 5 of 3 classes (test_metrics checks acc5 itself).
  assert got["mean_per_class_recall"] == pytest.approx(
      balanced_accuracy_score(labels, logits.argmax(1)))


def test_retrieval_with_several_captions_per_image(encoder, tfds_dir):
  bench = datasets.resolve("tiny_captions", data_dir=tfds_dir)
  assert bench.kind == "retrieval"
  examples = list(tfds.builder("tiny_captions", data_dir=tfds_dir)
                  .as_dataset(split="test").as_numpy_iterator())
  captions = [[c.decode() for c in e["captions"]["text"]] for e in examples]
  assert bench.captions("test") == captions
  assert sorted(captions) == sorted(CAPTIONS)
  got, _ = suite.zeroshot_retrieval(encoder, bench, split="test", batch_size=8)
  zimg = direct_embeddings(encoder, [e["image"] for e in examples])
  texts = [c for caps in captions for c in caps]
  owner = [i for i, caps in enumerate(captions) for _ in caps]
  sim = zimg @ encoder.embed_texts(texts).T
  for k in (1, 5, 10):
    # Image -> text: a hit if ANY of the image's captions is in its top k.
    hits = [any(owner[t] == i for t in np.argsort(-sim[i])[:k]) for i in range(len(zimg))]
    assert got[f"text_retrieval_recall@{k}"] == pytest.approx(np.mean(hits))
    hits = [owner[t] in np.argsort(-sim[:, t])[:k] for t in range(len(texts))]
    assert got[f"image_retrieval_recall@{k}"] == pytest.approx(np.mean(hits))


def test_tasks_for_a_dataset(tfds_dir):
  classes = datasets.resolve("tiny_classes", data_dir=tfds_dir)
  captions = datasets.resolve("tiny_captions", data_dir=tfds_dir)
  assert suite.tasks_for(classes, ["auto"]) == ["zeroshot_classification"]
  assert suite.tasks_for(captions, ["auto"]) == ["zeroshot_retrieval"]
  assert suite.tasks_for(captions, ["linear_probe"]) == []
  with pytest.raises(errors.DataError, match="unknown task"):
    suite.tasks_for(classes, ["zeroshot"])


def test_unprepared_and_unknown_datasets_say_how_to_fix(tmp_path):
  with pytest.raises(errors.DataError, match="not prepared.*tfds build mnist"):
    datasets.resolve("mnist", data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match="unknown shapes-world benchmark"):
    datasets.resolve("shapes_world/size", data_dir=str(tmp_path))


def test_result_files_follow_clip_benchmark_schema(tmp_path):
  records = [
      results.record("cifar10", "clip-B/16", "/runs/x@100", "zeroshot_classification",
                     {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.5}),
      results.record("folder:/data/pets", "clip-B/16", "/runs/x@100", "linear_probe",
                     {"lp_acc1": 0.7, "lp_acc5": 0.95, "lp_mean_per_class_recall": 0.6,
                      "lp_wd": 1e-4})]
  paths = results.write(records, str(tmp_path))
  written = sorted(p.name for p in tmp_path.glob("*.json"))
  assert written == ["cifar10_x@100_clip-B_16_en_zeroshot_classification.json",
                     "folder_data_pets_x@100_clip-B_16_en_linear_probe.json"]
  for name, rec in zip(written, records):
    loaded = json.loads((tmp_path / name).read_text())
    assert tuple(loaded) == results.SCHEMA_KEYS
    assert loaded == rec and loaded["language"] == "en"
  rows = list(csv.DictReader(open(paths["csv"])))
  assert [r["task"] for r in rows] == ["zeroshot_classification", "linear_probe"]
  assert float(rows[0]["acc1"]) == 0.5 and rows[0]["lp_acc1"] == ""
  table = open(paths["markdown"]).read()
  assert "| cifar10 | clip-B/16 | 0.5000 | 0.9000 | 0.5000 |" in table
  assert "**linear_probe**" in table


def test_linear_probe_reuses_the_test_embeddings(encoder, tfds_dir):
  from multimodal.evaluators import linear_probe
  bench = datasets.resolve("tiny_classes", data_dir=tfds_dir)
  memo = {}
  suite.zeroshot_classification(encoder, bench, split="test", batch_size=8,
                                cache_dir=None, memo=memo)
  got, timings = suite.run_linear_probe(encoder, bench, split="test", batch_size=8, memo=memo)
  assert [t.examples for t in timings] == [30]  # Only the train split was embedded anew.
  # The same as the probe on features computed without the pipeline.
  builder = tfds.builder("tiny_classes", data_dir=tfds_dir)
  splits = {s: list(builder.as_dataset(split=s).as_numpy_iterator()) for s in ("train", "test")}
  x = {s: direct_embeddings(encoder, [e["image"] for e in ex]) for s, ex in splits.items()}
  y = {s: np.array([e["label"] for e in ex]) for s, ex in splits.items()}
  want = linear_probe.linear_probe(x["train"], y["train"], x["test"], y["test"], 3)
  assert got == pytest.approx(want, abs=1e-6)


def test_linear_probe_needs_a_train_split(encoder, tmp_path):
  from PIL import Image
  for i, name in enumerate(NAMES):
    (tmp_path / name).mkdir()
    Image.fromarray(_image(i, i)).save(tmp_path / name / "0.png")
  bench = datasets.resolve(f"folder:{tmp_path}")
  with pytest.raises(errors.DataError, match="needs PATH/train/<class>/ and PATH/test"):
    suite.run_linear_probe(encoder, bench, split=None, batch_size=8)
