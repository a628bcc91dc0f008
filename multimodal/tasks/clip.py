"""Contrastive image-text pretraining: CLIP (softmax) and SigLIP (sigmoid)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.config import config_lib
from multimodal.data import pipeline, preprocess, templates, tokenizer as tokenizer_lib
from multimodal.evaluators import retrieval, zero_shot
from multimodal.models import two_towers
from multimodal.parallel import sharding
from multimodal.tasks import base, contrastive_losses as losses
from multimodal.train import accumulate, optim

LOSSES = ("softmax", "sigmoid")
# config.loss_impl: "dense" lets XLA gather the global batch and build the
# [B, B] logits; "ring" (sigmoid only) passes text chunks around the batch
# devices so no device holds more than a [b, b] block (losses.py).
LOSS_IMPLS = ("dense", "ring")
# How many training captions teach the tokenizer when none is given.
TOKENIZER_TRAINING_EXAMPLES = 20_000


def loss_impl(config) -> str:
  """config.loss_impl (default "dense"), checked against config.loss."""
  impl = config.get("loss_impl", "dense")
  if impl not in LOSS_IMPLS:
    raise config_lib.ConfigError(
        f"config.loss_impl={impl!r} is not one of {LOSS_IMPLS}.")
  if impl == "ring" and config.loss != "sigmoid":
    # The softmax normalises each row over the whole batch, which the ring's
    # independent blocks cannot do in one pass.
    raise config_lib.ConfigError(
        f"config.loss_impl='ring' needs config.loss='sigmoid', but "
        f"config.loss={config.loss!r}: set config.loss_impl='dense', or "
        "train SigLIP (configs/siglip_shapes.py).")
  return impl


class ContrastiveTask(base.Task):
  """Two towers trained with config.loss in {"softmax", "sigmoid"}; for
  "sigmoid", config.loss_impl="ring" computes it without the global logits."""

  def __init__(self, config):
    super().__init__(config)
    self._encoders_by_mesh = {}
    if config.loss not in LOSSES:
      raise ValueError(f"config.loss={config.loss!r} is not one of {LOSSES}.")
    loss_impl(config)  # A wrong choice fails now, not at the first step.
    self.tokenizer = self._tokenizer()
    self.max_len = config.input.tokenizer.max_len
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    self.model = two_towers.TwoTowers(
        image={**config.model.image.to_dict(), "dtype": dtype, "remat": self.remat},
        text={**config.model.text.to_dict(), "dtype": dtype, "remat": self.remat,
              "vocab_size": self.tokenizer.vocab_size,
              "eos_id": self.tokenizer.eos_id, "pad_id": self.tokenizer.pad_id},
        out_dim=config.model.out_dim,
        temperature_init=config.model.temperature_init,
        bias_init=config.model.get("bias_init"))

  def _tokenizer(self):
    cfg = self.config.input.tokenizer
    split = self.config.input.split

    def training_captions():
      ds = self.source.read(split).take(TOKENIZER_TRAINING_EXAMPLES)
      for example in ds.as_numpy_iterator():
        for caption in np.atleast_1d(example["captions"]):
          yield caption.decode("utf-8")

    # Keyed by dataset, config and version: a regenerated world gets its own.
    name = (self.source.builder.info.full_name if self.source.builder
            else self.source.name)
    safe_name = "".join(c if c.isalnum() else "_" for c in name)
    return tokenizer_lib.get_tokenizer(
        cfg.get("model"), cache_dir=self.source.data_dir,
        cache_name=f"{safe_name}_captions", texts_fn=training_captions,
        vocab_size=cfg.vocab_size)

  # --- the trainer's interface -------------------------------------------

  def train_pp(self):
    return preprocess.build(self.config.input.pp, tokenizer=self.tokenizer)

  def init(self, rng):
    size = self.config.input.image_size
    image = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, self.max_len), jnp.int32)
    return self.model.init(rng, image, tokens)["params"]

  def loss_fn(self, params, batch, rng):
    del rng  # No dropout in these models yet.
    zimg, ztxt, aux = self.model.apply(
        {"params": params}, batch["image"], batch["tokens"], train=True)
    return self._contrastive(zimg, ztxt, aux)

  def loss_and_grads(self, params, batch, rng, microbatches, freeze=None):
    """Accumulation for a loss that couples the whole batch (every image
    against every text), exact as in open_clip's --accum-freq (GradCache):
    1. embed each microbatch, keeping no activations;
    2. the loss on all B embeddings, and its gradient with respect to them
       (and to the temperature and bias);
    3. each microbatch again, pulling its slice of that gradient back
       through the towers (a VJP), summed over microbatches.
    Towers run forward twice; activations live for one microbatch.

    With config.grad_accum_unroll the microbatches are written out instead
    (a speed setting): each tower runs forward once per microbatch and its
    VJP keeps the activations for step 3, so no forward runs twice."""
    if microbatches == 1:
      return super().loss_and_grads(params, batch, rng, microbatches, freeze)
    micro = accumulate.split(batch, microbatches)

    @functools.partial(optim.without_frozen_gradients, freeze=freeze)
    def towers(p, microbatch):
      zimg, ztxt, _ = self.model.apply(
          {"params": p}, microbatch["image"], microbatch["tokens"], train=True)
      return zimg, ztxt

    @functools.partial(optim.without_frozen_gradients, freeze=freeze)
    def head(p, zimg, ztxt):
      _, _, aux = self.model.apply({"params": p}, None, None, train=True)
      return self._contrastive(accumulate.merge(zimg), accumulate.merge(ztxt), aux)

    if self.config.get("grad_accum_unroll"):
      pieces = [jax.tree.map(lambda x, j=j: x[j], micro) for j in range(microbatches)]
      embedded, vjps = zip(*(jax.vjp(lambda p, m=m: towers(p, m), params) for m in pieces))
      zimg, ztxt = (jnp.stack(z) for z in zip(*embedded))  # [k, b, D] each.
      (loss, metrics), (grads, dzimg, dztxt) = jax.value_and_grad(
          head, argnums=(0, 1, 2), has_aux=True)(params, zimg, ztxt)
      for j, vjp in enumerate(vjps):
        grads = jax.tree.map(jnp.add, grads, vjp((dzimg[j], dztxt[j]))[0])
      return (loss, metrics), grads

    zimg, ztxt = jax.lax.map(lambda m: towers(params, m), micro)  # [k, b, D] each.
    (loss, metrics), (grads, dzimg, dztxt) = jax.value_and_grad(
        head, argnums=(0, 1, 2), has_aux=True)(params, zimg, ztxt)

    def pull_back(grads, xs):
      microbatch, dzi, dzt = xs
      _, vjp = jax.vjp(lambda p: towers(p, microbatch), params)
      return jax.tree.map(jnp.add, grads, vjp((dzi, dzt))[0]), None

    grads, _ = jax.lax.scan(pull_back, grads, (micro, dzimg, dztxt))
    return (loss, metrics), grads

  def _contrastive(self, zimg, ztxt, aux):
    """(loss, metrics) of embeddings of the whole batch."""
    if loss_impl(self.config) == "ring":
      loss, rows = losses.sigmoid_contrastive_loss_ring(
          zimg, ztxt, aux["t"], aux["b"])
      # No [B, B] logits to take an argmax of: image i's text is its top
      # match iff its positive beats its best negative (ties aside).
      in_batch_accuracy = jnp.mean(
          rows["positive_logits"] > rows["max_negative_logits"])
    else:
      if self.config.loss == "softmax":
        loss, logits = losses.softmax_contrastive_loss(zimg, ztxt, aux["t"])
      else:
        loss, logits = losses.sigmoid_contrastive_loss(
            zimg, ztxt, aux["t"], aux["b"])
      in_batch_accuracy = jnp.mean(
          jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
    metrics = {"temperature": aux["t"], "in_batch_accuracy": in_batch_accuracy}
    if "b" in aux:
      metrics["bias"] = aux["b"]
    return loss, metrics

  def _encoders(self, mesh):
    """(encode_images, embed_tokens, encode_texts), jitted once per mesh and
    shared by every evaluator, so each compiles once."""
    if mesh not in self._encoders_by_mesh:
      encode_images = jax.jit(
          lambda params, images: self.model.apply(
              {"params": params}, images, method=self.model.embed_image)[0],
          out_shardings=sharding.batch_sharding(mesh))
      embed_tokens = jax.jit(
          lambda params, tokens: self.model.apply(
              {"params": params}, tokens, method=self.model.embed_text)[0],
          out_shardings=sharding.replicated(mesh))

      def encode_texts(params, texts):
        return embed_tokens(params, self.tokenizer.encode(list(texts), self.max_len))

      self._encoders_by_mesh[mesh] = encode_images, embed_tokens, encode_texts
    return self._encoders_by_mesh[mesh]

  def _eval_batches(self, cfg, mesh):
    pp_fn = preprocess.build(cfg.pp, tokenizer=self.tokenizer)
    filter_fn = pipeline.is_single_object if cfg.get("single_object_only") else None
    return self.eval_batches(
        mesh, split=cfg.split, pp_fn=pp_fn, filter_fn=filter_fn,
        batch_size=cfg.get("batch_size", self.config.input.batch_size))

  def _zero_shot(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    encode_images, _, encode_texts = self._encoders(mesh)
    return zero_shot.ZeroShotClassification(
        name=name, batches=self._eval_batches(cfg, mesh),
        class_names=self.source.class_names(cfg.classes),
        templates=templates.get(cfg.templates),
        encode_texts=encode_texts, encode_images=encode_images)

  def _retrieval(self, name, cfg, mesh, workdir):
    del workdir  # It writes no files.
    encode_images, embed_tokens, _ = self._encoders(mesh)
    return retrieval.Retrieval(
        name=name, batches=self._eval_batches(cfg, mesh), encode_images=encode_images,
        encode_tokens=embed_tokens)

  EVALUATORS = {"zero_shot": _zero_shot, "retrieval": _retrieval}
