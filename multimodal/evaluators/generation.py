"""Evaluators of a generative model: sample grids and the denoising loss.

Each takes the (EMA) params the trainer passes and knows nothing of the model
beyond the functions it is given.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from multimodal.evaluators import common


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
