"""The frozen text tower of a CLIP/SigLIP run, as a conditioning signal.

A text-conditioned model (the DiT) keeps these weights inside its own params
under "text_encoder" (so they are checkpointed and sharded like everything
else) and freezes them with `config.freeze`; this class builds the tower,
tokenizes prompts with the run's own tokenizer, loads the run's weights, and
encodes tokens into what the DiT reads: the pooled contrastive embedding
(for adaLN) and the token sequence (for cross-attention).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.config import config_lib
from multimodal.models import two_towers
from multimodal.parallel import sharding
from multimodal.train import trainer

PARAMS_KEY = "text_encoder"


class FrozenTextEncoder:
  """`encoder(params, tokens) -> (pooled [B, out_dim], tokens [B, L, width], mask [B, L])`."""

  def __init__(self, config, locate_run: Callable[[], str], *, name: str):
    """config: the CLIP run's config, which gives the tower's architecture and
    tokenizer; locate_run() -> its workdir, called only when its weights are
    read (which may train a cached run first); name: the run for errors,
    e.g. "in '<workdir>'" (trained_runs.describe).

    A finished text-conditioned run holds the tower's weights in its own
    checkpoint, so sampling from it needs only the config.
    """
    from multimodal.tasks import clip  # Deferred: a task module imports this one.
    self._locate_run = locate_run
    self.config = config
    if self.config.task != "clip":
      raise config_lib.ConfigError(
          f"the text encoder run {name} is a '{self.config.task}' run; it must "
          "be a CLIP or SigLIP run (task 'clip'), e.g. configs/clip_shapes.py.")
    self.clip_task = clip.ContrastiveTask(self.config)
    self.tokenizer = self.clip_task.tokenizer
    self.max_len = self.clip_task.max_len
    # Every token's encoding, which the conditioned model reads.
    self.module = two_towers.text_tower(
        two_towers.every_token_encoded(self.clip_task.model.text),
        self.clip_task.model.out_dim)
    self.out_dim = self.clip_task.model.out_dim
    self.width = self.module._config()["width"]

  @classmethod
  def of_run(cls, workdir: str) -> "FrozenTextEncoder":
    """The text tower of the finished run in `workdir`."""
    return cls(config_lib.load_workdir_config(workdir), lambda: workdir, name=f"in {workdir!r}")

  @functools.cached_property
  def workdir(self) -> str:
    return self._locate_run()

  def init(self, rng):
    """Boxed params of the tower's shapes (real values come from `weights`)."""
    return self.module.init(rng, jnp.zeros((1, self.max_len), jnp.int32))["params"]

  def weights(self) -> dict:
    """The run's trained text tower (its EMA when it kept one), on host."""
    mesh = sharding.make_mesh({"data": -1})
    state = trainer.restore_latest(self.clip_task, self.config, self.workdir, mesh)
    return jax.device_get(trainer.eval_params(state)["txt"])

  def tokenize(self, texts) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(list(texts), self.max_len), np.int32)

  def __call__(self, params, tokens):
    z, aux = self.module.apply({"params": params}, tokens)
    valid = tokens != self.tokenizer.pad_id
    return two_towers.l2_normalize(z), aux["encoded"], valid
