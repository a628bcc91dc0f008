"""An independent recognizer for generated images: a classifier run of this
codebase (task "classify", e.g. configs/shapes_classifier.py), loaded from its
workdir and applied to samples at whatever resolution they come in.
A generative run that has none trains one on first use
(`trained_runs.ensure_trained`).
"""
from __future__ import annotations

import jax
import numpy as np

from multimodal.config import config_lib
from multimodal.evaluators import common
from multimodal.parallel import sharding
from multimodal.tasks import classify
from multimodal.train import trainer


class Recognizer:
  """`recognizer(images) -> ({head: logits [B, classes]}, features [B, D])`."""

  def __init__(self, workdir: str, mesh):
    self.workdir = workdir
    self.config = config_lib.load_workdir_config(workdir)
    if self.config.task != "classify":
      raise config_lib.ConfigError(
          f"the recognizer in {workdir} is a '{self.config.task}' run; it must be a "
          "classifier (task 'classify'), e.g. configs/shapes_classifier.py.")
    task = classify.ClassificationTask(self.config)
    self.heads = sorted(task.heads)
    self.image_size = self.config.input.image_size
    self.mesh = mesh
    state = trainer.restore_latest(task, self.config, workdir, mesh)
    self.params = trainer.eval_params(state)
    self._predict = task.predict_fn(mesh)
    self.step = int(state["step"])

  def __call__(self, images):
    images = jax.numpy.asarray(images)
    b, h, w, c = images.shape
    if (h, w) != (self.image_size, self.image_size):
      images = jax.image.resize(images, (b, self.image_size, self.image_size, c),
                                "bilinear", antialias=True)
    with sharding.mesh_context(self.mesh):
      return self._predict(self.params, images)

  def predict(self, images) -> tuple[dict, np.ndarray]:
    """Host numpy: ({head: predicted class [B]}, features [B, D])."""
    logits, features = self(images)
    return ({h: common.to_host(l).argmax(-1) for h, l in logits.items()},
            common.to_host(features).astype(np.float32))
