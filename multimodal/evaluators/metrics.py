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
