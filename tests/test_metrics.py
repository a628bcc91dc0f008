"""Zero-shot metrics against sklearn; retrieval recall against brute force."""
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from multimodal.evaluators import metrics, zero_shot

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 8, size=300)
  logits = rng.normal(size=(300, 8)) + 2.0 * np.eye(8)[labels] * rng.random((300, 1))
  got = metrics.classification_metrics(logits, labels)
  assert got["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert got["acc5"] == pytest.approx(
      top_k_accuracy_score(labels, logits, k=5, labels=np.arange(8)))
  assert got["mean_per_class_recall"] == pytest.approx(
      balanced_accuracy_score(labels, logits.argmax(1)))


def test_mean_per_class_recall_differs_from_accuracy_on_imbalance():
  labels = np.array([0] * 9 + [1])
  logits = np.tile([[1.0, 0.0]], (10, 1))  # Always predicts class 0.
  got = metrics.classification_metrics(logits, labels)
  assert got["acc1"] == pytest.approx(0.9)
  assert got["mean_per_class_recall"] == pytest.approx(0.5)


def brute_force_recall(similarity, text_to_image, k):
  num_images, num_texts = similarity.shape
  i2t = []
  for i in range(num_images):
    top = sorted(range(num_texts), key=lambda t: -similarity[i, t])[:k]
    i2t.append(any(text_to_image[t] == i for t in top))
  t2i = []
  for t in range(num_texts):
    top = sorted(range(num_images), key=lambda i: -similarity[i, t])[:k]
    t2i.append(text_to_image[t] in top)
  return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("captions_per_image", [1, 3])
def test_retrieval_recall_matches_brute_force(captions_per_image):
  rng = np.random.default_rng(captions_per_image)
  num_images = 40
  text_to_image = np.repeat(np.arange(num_images), captions_per_image)
  similarity = rng.normal(size=(num_images, len(text_to_image)))
  similarity[text_to_image, np.arange(len(text_to_image))] += 1.5
  got = metrics.retrieval_metrics(similarity, text_to_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i2t, t2i = brute_force_recall(similarity, text_to_image, k)
    assert got[f"image_to_text_recall@{k}"] == pytest.approx(i2t)
    assert got[f"text_to_image_recall@{k}"] == pytest.approx(t2i)


def test_class_embeddings_average_templates_then_renormalise():
  table = {"a cat": [1.0, 0.0], "the cat": [0.0, 1.0],
           "a dog": [-1.0, 0.0], "the dog": [-1.0, 0.0]}
  encode = lambda prompts: np.array([table[p] for p in prompts])
  z = zero_shot.class_embeddings(["cat", "dog"], ["a {}", "the {}"], encode)
  np.testing.assert_allclose(z[0], np.array([1, 1]) / np.sqrt(2), atol=1e-6)
  np.testing.assert_allclose(z[1], [-1, 0], atol=1e-6)


def _scipy_frechet(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's formula, with scipy's matrix square root."""
  from scipy import linalg
  covmean = linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_scipy_reference(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + rng.normal(size=16)
  stats_a, stats_b = metrics.gaussian_statistics(a), metrics.gaussian_statistics(b)
  got = metrics.frechet_distance(*stats_a, *stats_b)
  assert got == pytest.approx(_scipy_frechet(*stats_a, *stats_b), rel=1e-6)
  assert got > 1.0  # Different distributions are far apart...
  assert metrics.frechet_distance(*stats_a, *stats_a) == pytest.approx(0.0, abs=1e-6)
  # ...and a pure shift by d costs exactly ||d||^2.
  shift = rng.normal(size=16)
  stats_shifted = metrics.gaussian_statistics(a + shift)
  assert metrics.frechet_distance(*stats_a, *stats_shifted) == pytest.approx(
      shift @ shift, rel=1e-6)
