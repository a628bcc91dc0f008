"""The classification family: a multi-head ViT classifier, its accuracy
evaluator (checked against sklearn), and its use as a cached recognizer."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from conftest import TINY_RECOGNIZER, TINY_WORLD, assert_logically_partitioned
from multimodal.config import config_lib
from multimodal.evaluators import classification
from multimodal.models import classifier
from multimodal.parallel import sharding
from multimodal.tasks import recognizer, trained_runs
from multimodal.tasks.classify import ClassificationTask


@pytest.mark.unit
def test_classifier_has_one_head_per_label_on_a_shared_backbone():
  model = classifier.ImageClassifier(
      image=dict(variant="mu/8", pool_type="gap"), heads={"shape": 8, "colour": 5})
  images = jnp.zeros((3, 32, 32, 3))
  boxed = model.init(jax.random.key(0), images)["params"]
  assert_logically_partitioned(boxed)
  params = jax.tree.map(lambda x: x.value, boxed,
                        is_leaf=lambda x: hasattr(x, "names"))
  assert set(params) == {"img", "head_shape", "head_colour"}
  logits, features = model.apply({"params": params}, images)
  assert logits["shape"].shape == (3, 8) and logits["colour"].shape == (3, 5)
  assert features.shape == (3, 64)
  with pytest.raises(ValueError, match="num_classes must be unset"):
    classifier.ImageClassifier(image=dict(variant="mu/8", num_classes=3),
                               heads={"a": 2}).init(jax.random.key(0), images)


@pytest.mark.unit
def test_accuracy_evaluator_matches_sklearn_and_drops_padding():
  rng = np.random.default_rng(0)
  n = 50
  labels = {"shape": rng.integers(0, 4, n), "colour": rng.integers(0, 3, n)}
  logits = {"shape": rng.normal(size=(n, 4)), "colour": rng.normal(size=(n, 3))}
  # Make the colour head mostly right, so the joint accuracy is not trivial.
  logits["colour"][np.arange(40), labels["colour"][:40]] += 5

  def batches():  # Two batches of 32; the last 14 rows are padding.
    for start in (0, 32):
      idx = np.arange(start, start + 32) % n
      mask = np.arange(start, start + 32) < n
      yield {"image": idx, "_mask": mask,
             **{h: np.where(mask, labels[h][idx], 0) for h in labels}}

  evaluator = classification.Accuracy(
      name="acc", heads=["colour", "shape"], batches=batches,
      logits=lambda params, idx: {h: logits[h][idx] for h in logits})
  results = evaluator.run(params=None)
  for head in labels:
    pred = logits[head].argmax(1)
    assert results[f"{head}_acc1"] == pytest.approx(accuracy_score(labels[head], pred))
    assert results[f"{head}_mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels[head], pred))
  both = (logits["shape"].argmax(1) == labels["shape"]) & (
      logits["colour"].argmax(1) == labels["colour"])
  assert results["all_acc1"] == pytest.approx(both.mean())


@pytest.mark.quality
def test_recognizer_is_trained_once_and_then_reused(recognizer_workdir, data_dir, tmp_path):
  with open(os.path.join(recognizer_workdir, "results.json")) as f:
    results = json.load(f)["metrics"]
  # 60 steps on 32 px images: colour is learnt, far above 1/8 chance.
  assert results["accuracy_test/colour_acc1"] > 0.5, results
  stamp = os.path.getmtime(os.path.join(recognizer_workdir, "results.json"))
  cache_root = os.path.dirname(recognizer_workdir)
  again = trained_runs.ensure_trained(TINY_RECOGNIZER, ClassificationTask, cache_root=cache_root,
                                    data_dir=data_dir, shapes_world=TINY_WORLD)
  assert again == recognizer_workdir
  assert os.path.getmtime(os.path.join(again, "results.json")) == stamp
  # A different config is a different recognizer (keyed by its hash).
  other = trained_runs.cache_workdir(
      config_lib.load_config_file(TINY_RECOGNIZER.replace("steps=60", "steps=61")),
      cache_root, "shapes_classifier")
  assert other != recognizer_workdir


@pytest.mark.unit
def test_recognizer_names_colours_of_real_images_at_any_resolution(recognizer_workdir):
  from multimodal.data import preprocess, shapes_world
  mesh = sharding.make_mesh({"data": -1})
  model = recognizer.Recognizer(recognizer_workdir, mesh)
  assert model.heads == ["colour", "shape"]
  # The tiny recognizer learnt object-centred crops (crop=True), so render
  # scenes and crop them the same way, but keep them at 64 px.
  crop = preprocess.build("crop_to_object(margin=0.25)|resize(64)|value_range(-1,1)")
  rng = np.random.default_rng(0)
  images, colours = [], []
  for colour in shapes_world.COLOURS:
    objects = [dict(shape="square", colour=colour, size="large", position="center")]
    image, boxes = shapes_world.render(objects, rng, 64)
    images.append(crop({"image": image, "objects": {"bbox": boxes}})["image"].numpy())
    colours.append(shapes_world.COLOURS.index(colour))
  # 64 px in, resized to the recognizer's 32 px.
  predictions, features = model.predict(np.stack(images))
  assert features.shape == (8, 64)
  assert np.mean(predictions["colour"] == np.array(colours)) >= 0.75, predictions


@pytest.mark.unit
def test_recognizer_refuses_a_run_that_is_not_a_classifier(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "dit"}))
  with pytest.raises(ValueError, match="must be a classifier"):
    recognizer.Recognizer(str(tmp_path), sharding.make_mesh({"data": -1}))
