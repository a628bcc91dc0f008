"""Supervised classification accuracy, per head and for all heads at once."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from multimodal.evaluators import common, metrics


def joint_accuracy(predictions: dict, labels: dict) -> float:
  """The fraction of examples whose every head is right."""
  right = np.logical_and.reduce([np.asarray(predictions[h]) == np.asarray(labels[h])
                                 for h in labels])
  return float(np.mean(right))


@dataclasses.dataclass
class Accuracy:
  """acc1/acc5/mean per-class recall of each head, and `all_acc1` (every
  head right; with heads shape and colour, the object named exactly)."""
  name: str
  heads: Sequence[str]
  batches: Callable[[], Iterable[dict]]  # Global batches: image, one label per head.
  logits: Callable  # (params, images) -> {head: [B, classes]}

  def run(self, params) -> dict:
    out = common.collect(self.batches(), lambda batch: {
        **{f"logits/{h}": l for h, l in self.logits(params, batch["image"]).items()},
        **{f"label/{h}": batch[h] for h in self.heads}})
    results, predictions, labels = {}, {}, {}
    for head in self.heads:
      logits, labels[head] = out[f"logits/{head}"], out[f"label/{head}"]
      predictions[head] = logits.argmax(-1)
      for key, value in metrics.classification_metrics(logits, labels[head]).items():
        results[f"{head}_{key}"] = value
    if len(self.heads) > 1:
      results["all_acc1"] = joint_accuracy(predictions, labels)
    return results
