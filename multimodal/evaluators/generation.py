"""Evaluators of a generative model: sample grids, the denoising loss, and
conditional accuracy and FID under an independent recognizer.

Each takes the (EMA) params the trainer passes and knows nothing of the model
beyond the functions it is given.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from multimodal.evaluators import classification, common, metrics


def image_grid(images: np.ndarray, cols: int, gap: int = 2) -> np.ndarray:
  """[N, H, W, 3] floats in [-1, 1] -> one uint8 mosaic, `cols` wide."""
  images = np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 128, np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    y, x = gap + r * (h + gap), gap + k * (w + gap)
    grid[y:y + h, x:x + w] = image
  return grid


def save_png(grid: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid).save(path)
  return path


@dataclasses.dataclass
class SampleGrid:
  """Samples one image per conditioning label and writes them as a PNG grid.

  Files go to `output_dir/samples_NNN.png` (NNN counts this evaluator's runs,
  so periodic evaluations keep every grid) and `samples_latest.png`.
  """
  name: str
  sample: Callable  # (params, labels) -> images [N, H, W, 3] in [-1, 1]
  labels: np.ndarray
  cols: int
  output_dir: str | None
  runs: int = 0

  def run(self, params) -> dict:
    images = common.to_host(self.sample(params, self.labels))
    self.runs += 1
    if self.output_dir is not None:
      grid = image_grid(images, self.cols)
      save_png(grid, os.path.join(self.output_dir, f"samples_{self.runs:03d}.png"))
      save_png(grid, os.path.join(self.output_dir, "samples_latest.png"))
    # Saturated or constant grids show up here before anyone opens the PNG.
    return {"pixel_mean": float(images.mean()), "pixel_std": float(images.std())}


@dataclasses.dataclass
class DenoisingLoss:
  """The training objective on held-out data, at fixed noise per example.

  `loss(params, batch) -> per-example losses [B]`; padded rows (`_mask`
  False) are left out of the mean.
  """
  name: str
  batches: Callable[[], Iterable[dict]]
  loss: Callable

  def run(self, params) -> dict:
    out = common.collect(self.batches(), lambda batch: {
        "loss": self.loss(params, batch)})
    return {"loss": float(np.mean(out["loss"]))}


@dataclasses.dataclass
class GenerationQuality:
  """Conditional accuracy and FID of samples, judged by an independent recognizer.

  For every conditioning label, `per_label` samples are drawn; the recognizer
  names each sample's classes (e.g. its shape and its colour) and a sample
  counts as right when every head agrees with `targets` (what the label
  asked for). FID compares the recognizer's features of the samples with its
  features of real images; the recognizer's own accuracy on those real images
  is reported beside it, so a weak judge cannot pass for a weak generator.

  Labels listed in `novel_labels` (never seen in training) are scored
  separately: `conditional_accuracy` covers only the labels the model was
  trained on.
  """
  name: str
  sample: Callable  # (params, labels [N] sharded) -> images [N, H, W, 3] in [-1, 1]
  labels: np.ndarray  # [L] distinct conditioning labels.
  targets: dict  # head -> [L] the class each label asks for.
  recognizer: Callable  # images -> ({head: [B] predicted class}, features [B, D])
  real_batches: Callable[[], Iterable[dict]]  # image plus one label per head.
  per_label: int
  batch_size: int
  put: Callable  # numpy labels -> device array sharded along the batch.
  novel_labels: tuple = ()
  _real: dict | None = None

  def _real_statistics(self) -> dict:
    """Recognizer accuracy and feature statistics of real images (once)."""
    if self._real is None:
      predictions, features, labels = {}, [], {}
      for batch in self.real_batches():
        mask = common.to_host(batch["_mask"]).astype(bool)
        pred, feats = self.recognizer(batch["image"])
        features.append(feats[mask])
        for head, p in pred.items():
          predictions.setdefault(head, []).append(p[mask])
          labels.setdefault(head, []).append(common.to_host(batch[head])[mask])
      predictions = {h: np.concatenate(v) for h, v in predictions.items()}
      labels = {h: np.concatenate(v) for h, v in labels.items()}
      self._real = {
          "accuracy": classification.joint_accuracy(predictions, labels),
          "head_accuracy": {h: float(np.mean(predictions[h] == labels[h])) for h in labels},
          "statistics": metrics.gaussian_statistics(np.concatenate(features))}
    return self._real

  def _samples(self, params, labels: np.ndarray) -> np.ndarray:
    """Samples for `labels`, in fixed-size (padded) batches: one compile."""
    out = []
    for start in range(0, len(labels), self.batch_size):
      chunk = labels[start:start + self.batch_size]
      padded = np.resize(chunk, self.batch_size)  # Repeats; extras are dropped.
      out.append(common.to_host(self.sample(params, self.put(padded)))[:len(chunk)])
    return np.concatenate(out)

  def run(self, params) -> dict:
    real = self._real_statistics()
    repeated = np.repeat(np.arange(len(self.labels)), self.per_label)
    images = self._samples(params, np.asarray(self.labels)[repeated])
    predictions, features = {}, []
    for start in range(0, len(images), self.batch_size):
      pred, feats = self.recognizer(images[start:start + self.batch_size])
      features.append(feats)
      for head, p in pred.items():
        predictions.setdefault(head, []).append(p)
    predictions = {h: np.concatenate(v) for h, v in predictions.items()}
    features = np.concatenate(features)
    right = np.logical_and.reduce([
        predictions[h] == np.asarray(self.targets[h])[repeated] for h in self.targets])
    novel = np.isin(np.asarray(self.labels)[repeated], np.asarray(self.novel_labels))
    results = {"conditional_accuracy": float(right[~novel].mean()),
               "fid": metrics.frechet_distance(
                   *metrics.gaussian_statistics(features[~novel]), *real["statistics"]),
               "recognizer_real_accuracy": real["accuracy"],
               "num_samples": int((~novel).sum())}
    for head in self.targets:
      hits = predictions[head] == np.asarray(self.targets[head])[repeated]
      results[f"{head}_accuracy"] = float(hits[~novel].mean())
      results[f"recognizer_real_{head}_accuracy"] = real["head_accuracy"][head]
    if novel.any():
      results["conditional_accuracy_novel"] = float(right[novel].mean())
    return results
