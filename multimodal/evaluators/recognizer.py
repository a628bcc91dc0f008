"""An independent recognizer for generated images: a classifier run of this
codebase (task "classify", e.g. configs/shapes_classifier.py), loaded from its
workdir and applied to samples at whatever resolution they come in.

`ensure_trained` makes "independent recognizer" cost the user nothing: the
first generative run that needs one trains it into a cache directory beside
the data (keyed by the recognizer's full config), later runs reuse it, and
a run interrupted half-way resumes from its checkpoint.
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

from multimodal import config_lib, sharding, trainer
from multimodal.evaluators import common


def cache_workdir(config, cache_root: str, name: str) -> str:
  """`cache_root/name-<hash of the config>`: a changed config trains anew."""
  digest = hashlib.sha256(config_lib.to_json(config).encode()).hexdigest()[:12]
  return os.path.join(cache_root, f"{name}-{digest}")


def ensure_trained(config_spec: str, *, cache_root: str, data_dir: str | None,
                   shapes_world: dict | None) -> str:
  """The workdir of a finished run of `config_spec`, training it if needed.

  The recognizer reads the same data (data_dir, shapes-world settings) as
  the run that asks for it, so it is trained on the same world it judges.
  """
  from multimodal import tasks  # Deferred: tasks import the evaluators.
  config = config_lib.load_config_file(config_spec)
  with config.unlocked():
    config.input.data_dir = data_dir
    if shapes_world is not None:
      config.input.shapes_world = dict(shapes_world)
  config_lib.validate(config)
  name = os.path.splitext(os.path.basename(config_spec.partition(":")[0]))[0]
  workdir = cache_workdir(config, cache_root, name)
  if not os.path.exists(os.path.join(workdir, "results.json")):
    print(f"Training the recognizer {config_spec} into {workdir} (once; later "
          "runs reuse it).")
    trainer.train(tasks.get(config.task)(config), config, workdir)
  return workdir


class Recognizer:
  """`recognizer(images) -> ({head: logits [B, classes]}, features [B, D])`."""

  def __init__(self, workdir: str, mesh):
    from multimodal import tasks  # Deferred: tasks import the evaluators.
    self.workdir = workdir
    self.config = config_lib.load_workdir_config(workdir)
    if self.config.task != "classify":
      raise config_lib.ConfigError(
          f"the recognizer in {workdir} is a '{self.config.task}' run; it must be a "
          "classifier (task 'classify'), e.g. configs/shapes_classifier.py.")
    task = tasks.get("classify")(self.config)
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
