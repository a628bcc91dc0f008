"""Supervised image classification with a ViT: the trainer's simplest family.

The batch carries one integer label per head, under the head's name
(config.model.heads = {"shape": 8, "colour": 8} reads batch["shape"] and
batch["colour"]); the loss is the sum of the heads' softmax cross-entropies.
Besides being a model family of its own, a classifier trained here is the
independent recognizer that scores generated images (evaluators/recognizer.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from multimodal.data import pipeline, preprocess
from multimodal.evaluators import classification
from multimodal.models import classifier
from multimodal.parallel import sharding
from multimodal.tasks import base


class ClassificationTask(base.Task):
  """config.model.image: ViT fields; config.model.heads: name -> classes."""

  def __init__(self, config):
    super().__init__(config)
    self.heads = dict(config.model.heads)
    self.model = classifier.ImageClassifier(
        image={**config.model.image.to_dict(), "remat": self.remat}, heads=self.heads,
        dtype=jnp.dtype(config.get("compute_dtype", "float32")))

  def train_pp(self):
    return preprocess.build(self.config.input.pp)

  def train_filter(self):
    if self.config.input.get("single_object_only"):
      return pipeline.is_single_object
    return None

  def init(self, rng):
    size = self.config.input.image_size
    return self.model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def predict_fn(self, mesh):
    """A jitted (params, images) -> ({head: logits}, pre_logits features)."""
    return jax.jit(lambda params, images: self.model.apply({"params": params}, images),
                   out_shardings=sharding.batch_sharding(mesh))

  def loss_fn(self, params, batch, rng):
    del rng  # No dropout.
    logits, _ = self.model.apply({"params": params}, batch["image"], train=True)
    metrics, total = {}, 0.0
    for name, head_logits in logits.items():
      loss = optax.softmax_cross_entropy_with_integer_labels(
          head_logits, batch[name]).mean()
      metrics[f"{name}_loss"] = loss
      metrics[f"{name}_accuracy"] = jnp.mean(jnp.argmax(head_logits, -1) == batch[name])
      total = total + loss
    return total, metrics

  def _accuracy(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    predict = self.predict_fn(mesh)
    filter_fn = pipeline.is_single_object if cfg.get("single_object_only") else None
    return classification.Accuracy(
        name=name, heads=sorted(self.heads),
        batches=self.eval_batches(
            mesh, split=cfg.split, pp_fn=preprocess.build(cfg.pp), filter_fn=filter_fn,
            batch_size=cfg.get("batch_size", self.config.input.batch_size)),
        logits=lambda params, images: predict(params, images)[0])

  EVALUATORS = {"classification": _accuracy}
