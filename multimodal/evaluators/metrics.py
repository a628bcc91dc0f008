"""Metric math on host numpy arrays, kept apart from the model plumbing so it
can be checked against sklearn and brute-force references.
"""
from __future__ import annotations

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
  """acc@1, acc@5 and mean per-class recall (balanced accuracy).

  Mean per-class recall averages only over classes present in `labels`, as
  sklearn's balanced_accuracy_score does.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  ranking = np.argsort(-logits, axis=1, kind="stable")
  k = min(5, logits.shape[1])
  top1 = ranking[:, 0] == labels
  topk = (ranking[:, :k] == labels[:, None]).any(axis=1)
  recalls = [top1[labels == c].mean() for c in np.unique(labels)]
  return {"acc1": float(top1.mean()), "acc5": float(topk.mean()),
          "mean_per_class_recall": float(np.mean(recalls))}


def retrieval_metrics(similarity: np.ndarray, text_to_image: np.ndarray,
                      ks=(1, 5, 10)) -> dict:
  """Recall@k in both directions.

  Args:
    similarity: [num_images, num_texts] scores.
    text_to_image: [num_texts], the index of the image each text describes.
      An image with several texts is a hit if any of them is in its top k.
  """
  similarity = np.asarray(similarity)
  text_to_image = np.asarray(text_to_image)
  num_images, num_texts = similarity.shape
  # Rank of each text among all texts for its image: we only need whether
  # the best-ranked matching text is within k.
  image_order = np.argsort(-similarity, axis=1, kind="stable")
  matches = text_to_image[image_order] == np.arange(num_images)[:, None]
  first_match_rank = np.where(matches.any(1), matches.argmax(1), num_texts)
  text_order = np.argsort(-similarity.T, axis=1, kind="stable")
  text_rank = (text_order == text_to_image[:, None]).argmax(1)
  results = {}
  for k in ks:
    results[f"image_to_text_recall@{k}"] = float((first_match_rank < k).mean())
    results[f"text_to_image_recall@{k}"] = float((text_rank < k).mean())
  return results


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of [N, D] features, in float64, as FID uses them."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance of two Gaussians (FID, given Inception-like features):
  ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  Tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues
  of sigma1 sigma2, which is similar to the PSD sigma1^(1/2) sigma2
  sigma1^(1/2): its eigenvalues are real and >= 0 but for round-off, which is
  clipped. This avoids a matrix square root (scipy.linalg.sqrtm) and its
  complex round-off for singular covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
  trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
