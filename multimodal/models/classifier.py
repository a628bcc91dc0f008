"""A ViT image classifier with one or more named softmax heads.

Several heads share one backbone so that factored labels (a shape AND a
colour) are predicted separately: a joint head over all (shape, colour)
pairs could never name a pair it did not see in training, while two heads
name any combination of classes they each saw.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from multimodal.models import layers, vit


class ImageClassifier(nn.Module):
  """``__call__(images) -> (logits: {head: (B, classes)}, pre_logits (B, width))``.

  image: vit.ViT fields (num_classes must be unset: the heads are here).
  heads: head name -> number of classes, e.g. {"shape": 8, "colour": 8}.
  """
  image: Mapping[str, Any]
  heads: Mapping[str, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.image.get("num_classes"):
      raise ValueError("model.image.num_classes must be unset: classifier heads "
                       "are given by model.heads.")
    features, _ = vit.ViT(**{**self.image, "dtype": self.dtype}, name="img")(
        images, train=train)
    logits = {name: layers.head_dense(classes, zero_init=True, dtype=self.dtype,
                                      name=f"head_{name}")(features).astype(jnp.float32)
              for name, classes in sorted(self.heads.items())}
    return logits, features
