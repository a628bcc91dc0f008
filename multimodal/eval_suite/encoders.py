"""A two-tower model to benchmark: a run trained here or an imported Hugging
Face CLIP/SigLIP, behind one interface.

An `Encoder` knows how its images must be preprocessed (its pp spec), embeds
batches of images jitted and sharded over the mesh's data axis, and embeds
texts with its own tokenizer. Embeddings are L2-normalised float32.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from multimodal.config import config_lib
from multimodal.data import preprocess
from multimodal.models import two_towers
from multimodal.parallel import sharding

# Image ops a run's training pp may hold that also make sense at test time;
# random ones are replaced by their deterministic counterpart, shapes-world
# ones (crop_to_object needs object boxes) and flips are dropped.
_TEST_TIME_IMAGE_OPS = ("decode", "resize", "resize_small", "central_crop",
                        "value_range", "normalize")
TEXT_BATCH = 256  # Prompts per text-tower call (one compiled shape).


@dataclasses.dataclass
class Encoder:
  """Embeds images and texts into one space (unit vectors, float32).

  `model` names the architecture and `pretrained` the weights, as
  CLIP_benchmark's result files do; `fingerprint` changes whenever the
  weights do, and keys the cached text classifiers.
  """
  model: str
  pretrained: str
  fingerprint: str
  image_pp: str
  tokenizer: Any
  max_len: int
  module: two_towers.TwoTowers
  params: Any
  mesh: jax.sharding.Mesh

  def __post_init__(self):
    self.params = jax.device_put(self.params, sharding.replicated(self.mesh))
    self._embed_images = jax.jit(
        lambda params, images: self.module.apply(
            {"params": params}, images, method=self.module.embed_image)[0],
        out_shardings=sharding.batch_sharding(self.mesh))
    self._embed_tokens = jax.jit(
        lambda params, tokens: self.module.apply(
            {"params": params}, tokens, method=self.module.embed_text)[0],
        out_shardings=sharding.replicated(self.mesh))

  def embed_image_batch(self, images: jax.Array) -> jax.Array:
    """A global [B, H, W, C] batch (sharded on the batch axis) -> [B, D]."""
    return self._embed_images(self.params, images)

  def embed_texts(self, texts) -> np.ndarray:
    """[N, D] for N strings, in fixed-size batches (the last one padded)."""
    texts = list(texts)
    out = []
    for start in range(0, len(texts), TEXT_BATCH):
      chunk = texts[start:start + TEXT_BATCH]
      tokens = np.asarray(self.tokenizer.encode(
          chunk + [""] * (TEXT_BATCH - len(chunk)), self.max_len), np.int32)
      with sharding.mesh_context(self.mesh):
        z = self._embed_tokens(self.params, tokens)
      out.append(np.asarray(jax.device_get(z))[:len(chunk)])
    if not out:
      raise ValueError("embed_texts: no texts given.")
    return np.concatenate(out).astype(np.float32)


def _eval_mesh():
  # Embedding is data parallel: params replicated, images split over all devices.
  return sharding.make_mesh({"data": -1})


def test_time_image_pp(train_pp: str) -> str:
  """The image part of a run's training pp, made deterministic."""
  calls = []
  for call in preprocess.parse(train_pp):
    if call.name == "random_crop":
      call = dataclasses.replace(call, name="central_crop")
    if call.name in _TEST_TIME_IMAGE_OPS:
      calls.append(str(call))
  if not calls or calls[0] != "decode" and not calls[0].startswith("decode("):
    raise config_lib.ConfigError(
        f"could not derive the image preprocessing from config.input.pp={train_pp!r}: "
        "it should start with `decode` and resize the image.")
  return "|".join(calls)


def from_workdir(workdir: str) -> Encoder:
  """The latest checkpoint (its EMA params, if kept) of a CLIP/SigLIP run."""
  from multimodal.tasks import clip
  from multimodal.train import trainer
  config = config_lib.load_workdir_config(workdir)
  if config.task != "clip":
    raise config_lib.ConfigError(
        f"{workdir} is a '{config.task}' run; benchmarks evaluate CLIP/SigLIP runs "
        "(task 'clip'), e.g. one of configs/clip_shapes.py.")
  task = clip.ContrastiveTask(config)
  mesh = _eval_mesh()
  state = trainer.restore_latest(task, config, workdir, mesh)
  step = int(state["step"])
  family = "siglip" if config.loss == "sigmoid" else "clip"
  workdir = os.path.abspath(workdir)
  return Encoder(
      model=f"{family}-{config.model.image.variant}",
      pretrained=f"{workdir}@{step}",
      fingerprint=hashlib.sha256(f"{workdir}@{step}".encode()).hexdigest()[:16],
      image_pp=test_time_image_pp(config.input.pp),
      tokenizer=task.tokenizer, max_len=task.max_len, module=task.model,
      params=jax.device_get(trainer.eval_params(state)), mesh=mesh)


def _hf_fingerprint(directory: str) -> str:
  digest = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      stat = os.stat(path)
      digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
  return digest.hexdigest()[:16]


def from_hf(directory: str) -> Encoder:
  """A local Hugging Face CLIPModel/SiglipModel directory, with its own
  tokenizer and its preprocessor_config.json's image preprocessing."""
  from multimodal.importers import hf_clip, hf_preprocess, hf_tokenizer
  directory = os.path.abspath(os.path.expanduser(directory))
  kwargs, params = hf_clip.load_hf_clip(directory)
  tokenizer = hf_tokenizer.load_hf_tokenizer(directory)
  with open(os.path.join(directory, "config.json")) as f:
    model_type = json.load(f).get("model_type", "hf")
  return Encoder(
      model=f"{model_type}-{os.path.basename(directory)}",
      pretrained=f"hf:{directory}",
      fingerprint=_hf_fingerprint(directory),
      image_pp=hf_preprocess.image_pp_from_hf(directory),
      tokenizer=tokenizer, max_len=kwargs["text"]["max_len"],
      module=two_towers.TwoTowers(**kwargs),
      params=params, mesh=_eval_mesh())


def load(*, workdir: str | None = None, hf: str | None = None) -> Encoder:
  if (workdir is None) == (hf is None):
    raise config_lib.ConfigError("give exactly one of --workdir (a run trained here) "
                                 "and --hf (a Hugging Face model directory).")
  return from_workdir(workdir) if workdir is not None else from_hf(hf)
