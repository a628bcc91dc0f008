"""Losses. Each takes embeddings or logits of the *global* batch: under jit on a
mesh, XLA gathers what it needs, so no loss here sees only a per-device shard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# CLIP clamps its logit scale at 100 so the temperature cannot collapse.
MAX_LOGIT_SCALE = 100.0


def softmax_contrastive_loss(zimg, ztxt, logit_scale):
  """CLIP's symmetric InfoNCE over the batch.

  Args:
    zimg, ztxt: [B, D] L2-normalised embeddings; row i of each is a pair.
    logit_scale: the learnt multiplier t (not its log); clamped at 100.
  Returns:
    (loss, logits) with logits [B, B], image rows x text columns.
  """
  logit_scale = jnp.minimum(logit_scale, MAX_LOGIT_SCALE)
  logits = logit_scale * jnp.einsum("id,jd->ij", zimg, ztxt).astype(jnp.float32)
  labels = jnp.arange(logits.shape[0])
  image_to_text = -jnp.take_along_axis(
      jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
  text_to_image = -jnp.take_along_axis(
      jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
  return (image_to_text + text_to_image) / 2, logits


def sigmoid_contrastive_loss(zimg, ztxt, logit_scale, logit_bias):
  """SigLIP: every (image, text) pair is an independent binary problem.

  Normalised as in the SigLIP paper and big_vision: the sum over all B*B pairs
  divided by B.
  """
  logits = (logit_scale * jnp.einsum("id,jd->ij", zimg, ztxt).astype(jnp.float32)
            + logit_bias)
  labels = 2 * jnp.eye(logits.shape[0]) - 1  # +1 on the diagonal, -1 elsewhere.
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
  return loss, logits
