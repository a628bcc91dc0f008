"""Image-text retrieval at recall@1/5/10 in both directions."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from multimodal.evaluators import common, metrics


@dataclasses.dataclass
class Retrieval:
  """Every image against every caption of the split.

  Batches carry `image` [B, H, W, C] and `caption_tokens` [B, K, L]: the K
  captions of each image, all of which count as its matches.
  """
  name: str
  batches: Callable[[], Iterable[dict]]
  encode_images: Callable  # (params, images) -> [B, D]
  encode_tokens: Callable  # (params, tokens [N, L]) -> [N, D]
  ks: tuple[int, ...] = (1, 5, 10)

  def run(self, params) -> dict:
    out = common.collect(self.batches(), lambda batch: {
        "zimg": self.encode_images(params, batch["image"]),
        "tokens": batch["caption_tokens"]})
    num_images, per_image, length = out["tokens"].shape
    tokens = out["tokens"].reshape(num_images * per_image, length)
    ztxt = common.normalise(np.asarray(self.encode_tokens(params, tokens),
                                       np.float32))
    zimg = common.normalise(out["zimg"].astype(np.float32))
    text_to_image = np.repeat(np.arange(num_images), per_image)
    return metrics.retrieval_metrics(zimg @ ztxt.T, text_to_image, self.ks)
