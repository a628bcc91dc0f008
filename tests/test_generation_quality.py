"""Conditional accuracy and FID of samples under a recognizer, on a fake
sampler and recognizer whose right answers are known."""
import numpy as np
import pytest

from multimodal.evaluators import generation

pytestmark = pytest.mark.unit


def test_conditional_accuracy_counts_only_samples_whose_every_head_is_right():
  labels = np.arange(6, dtype=np.int32)  # Label k asks for shape k // 3, colour k % 3.
  targets = {"shape": labels // 3, "colour": labels % 3}
  rng = np.random.default_rng(0)
  sampled_batches = []

  def sample(params, batch_labels):
    sampled_batches.append(len(batch_labels))
    # Each image carries its label in pixel (0, 0, 0), plus noise elsewhere.
    images = rng.uniform(-1, 1, (len(batch_labels), 4, 4, 3)).astype(np.float32)
    images[:, 0, 0, 0] = batch_labels
    return images

  def recognizer(images):
    asked = np.rint(images[:, 0, 0, 0]).astype(int)
    shape = asked // 3
    colour = np.where(asked == 1, 0, asked % 3)  # Label 1: wrong colour.
    shape = np.where(asked == 4, 0, shape)       # Label 4: wrong shape.
    return {"shape": shape, "colour": colour}, images.reshape(len(images), -1)[:, 1:9]

  def real_batches():
    images = rng.uniform(-1, 1, (20, 4, 4, 3)).astype(np.float32)
    images[:, 0, 0, 0] = np.arange(20) % 6
    mask = np.arange(20) < 18  # Two padding rows.
    yield {"image": images, "_mask": mask,
           "shape": (np.arange(20) % 6) // 3, "colour": (np.arange(20) % 6) % 3}

  evaluator = generation.GenerationQuality(
      name="quality", sample=sample, labels=labels, targets=targets,
      recognizer=recognizer, real_batches=real_batches, per_label=5, batch_size=8,
      put=lambda x: x, novel_labels=(5,))
  results = evaluator.run(params=None)
  assert set(sampled_batches) == {8}  # Fixed-size batches: one compile.
  # Trained labels 0..4; labels 1 and 4 are always wrong, the others right.
  assert results["conditional_accuracy"] == pytest.approx(3 / 5)
  assert results["colour_accuracy"] == pytest.approx(4 / 5)
  assert results["shape_accuracy"] == pytest.approx(4 / 5)
  assert results["conditional_accuracy_novel"] == 1.0
  assert results["num_samples"] == 25
  # Real images: label 1 and 4 rows are misread (6 of 18 kept rows).
  assert results["recognizer_real_accuracy"] == pytest.approx(12 / 18)
  # Features: both are uniform noise, so FID is small but positive, and
  # large when the samples' features shift.
  assert 0 < results["fid"] < 3.0, results

