"""Zero-shot classification: name the class whose prompt embedding is nearest.

Each class's text embedding is the mean of its prompt templates' embeddings,
renormalised (CLIP's prompt ensembling).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from multimodal.evaluators import common, metrics


def class_embeddings(class_names: Sequence[str], templates: Sequence[str],
                     encode_texts: Callable[[list[str]], np.ndarray]) -> np.ndarray:
  """[num_classes, dim] unit vectors, one encoder call for all prompts."""
  prompts = [t.format(name) for name in class_names for t in templates]
  z = common.normalise(np.asarray(encode_texts(prompts), np.float32))
  z = z.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return common.normalise(z)


@dataclasses.dataclass
class ZeroShotClassification:
  """Reports acc1, acc5 and mean per-class recall on one labelled split."""
  name: str
  batches: Callable[[], Iterable[dict]]  # Global batches: image, label, _mask.
  class_names: Sequence[str]
  templates: Sequence[str]
  encode_texts: Callable  # (params, list[str]) -> [N, D]
  encode_images: Callable  # (params, images) -> [B, D]

  def run(self, params) -> dict:
    classifier = class_embeddings(
        self.class_names, self.templates,
        lambda prompts: self.encode_texts(params, prompts))
    out = common.collect(self.batches(), lambda batch: {
        "z": self.encode_images(params, batch["image"]),
        "label": batch["label"]})
    logits = common.normalise(out["z"].astype(np.float32)) @ classifier.T
    return metrics.classification_metrics(logits, out["label"])
