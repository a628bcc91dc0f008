"""Losses. Each takes embeddings or logits of the *global* batch: under jit on a
mesh, XLA gathers what it needs, so no loss here sees only a per-device shard.
The ring SigLIP loss also takes the global batch, but works on the shards
itself (shard_map) so that the global logits are never built.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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



def sigmoid_contrastive_loss_ring(zimg, ztxt, logit_scale, logit_bias, *,
                                  axes=("data", "fsdp"), mesh=None):
  """SigLIP's loss computed chunk by chunk around a ring of devices.

  The same value and gradients as `sigmoid_contrastive_loss`, but no device
  ever holds the global [B, B] logits, a [b, B] row block of them, or the
  gathered [B, D] text embeddings: each device keeps its own image embeddings
  and passes its text embeddings around the ring of batch devices with
  `ppermute`, scoring one [b, b] block per hop (b = B / number of batch
  devices), as in the SigLIP paper's chunked implementation. The backward pass
  goes around the ring again (a custom VJP) rather than keeping every hop's
  block for autodiff, so training, not only the forward pass, stays at one
  [b, b] block per device.

  Args:
    zimg, ztxt: [B, D] embeddings of the global batch, split over `axes`.
    logit_scale, logit_bias: scalars, as for `sigmoid_contrastive_loss`.
    axes: the mesh axes the batch is split over; those missing from the mesh
      are ignored, and axes of size 1 cost nothing.
    mesh: a Mesh or AbstractMesh; by default the ambient one
      (`sharding.mesh_context`, i.e. `jax.sharding.use_abstract_mesh`).
  Returns:
    (loss, row_stats). There are no [B, B] logits to return, so `row_stats`
    holds what the logits are used for besides the loss, per image row, each
    float32 [B] and split over `axes` like the batch:
      "positive_logits": the logit of image i with its own text i;
      "max_negative_logits": the largest logit of image i with any other
        text (-inf when B == 1).
    The dense in-batch top-1 accuracy `argmax(logits, 1) == i` is then
    `positive_logits > max_negative_logits` (they differ only on exact ties).
    The row stats are metrics: no gradient flows through them.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    # Without a mesh there is no ring to build; failing beats silently
    # computing the global logits this function exists to avoid.
    raise ValueError(
        "sigmoid_contrastive_loss_ring needs a device mesh: call it inside "
        "sharding.mesh_context(mesh) (as the trainer does) or pass mesh=.")
  axes = tuple(a for a in axes if a in mesh.axis_names)
  ring_size = math.prod(mesh.shape[a] for a in axes)
  global_batch = zimg.shape[0]
  if global_batch % ring_size:
    raise ValueError(
        f"the batch of {global_batch} does not split evenly over the "
        f"{ring_size} devices of mesh axes {axes}.")
  # Device i sends to device i + 1 (a tuple of axes is numbered in mesh
  # order), so after hop j device k holds the texts of device k - j.
  ring = [(i, (i + 1) % ring_size) for i in range(ring_size)]

  def rotate(x):
    return jax.lax.ppermute(x, axes, ring)

  def block(img, txt, scale, bias, has_positives):
    """(-sum of log-likelihoods, logits) of one [b, b] block."""
    # The dense loss's expression in the same order, so values agree.
    logits = (scale * jnp.einsum("id,jd->ij", img, txt).astype(jnp.float32)
              + bias)
    if has_positives:  # Our own texts: the positives are the diagonal.
      labels = 2 * jnp.eye(logits.shape[0]) - 1
    else:  # Another device's texts: all negatives.
      labels = -1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)), logits

  def forward(img, txt, scale, bias):
    total, logits = block(img, txt, scale, bias, True)
    eye = jnp.eye(logits.shape[0], dtype=bool)
    positive = jnp.diagonal(logits)
    max_negative = jnp.max(jnp.where(eye, -jnp.inf, logits), axis=1)

    def hop(_, carry):
      txt, total, max_negative = carry
      txt = rotate(txt)
      block_total, logits = block(img, txt, scale, bias, False)
      return (txt, total + block_total,
              jnp.maximum(max_negative, jnp.max(logits, axis=1)))

    if ring_size > 1:
      # ring_size - 1 hops: the last chunk is not sent on needlessly. A loop,
      # not unrolled, so the program does not grow with the ring.
      _, total, max_negative = jax.lax.fori_loop(
          0, ring_size - 1, hop, (txt, total, max_negative))
    return total, (positive, max_negative)

  @jax.custom_vjp
  def ring_sum(img, txt, scale, bias):
    return forward(img, txt, scale, bias)

  def ring_sum_fwd(img, txt, scale, bias):
    # Only the inputs are kept: the backward pass recomputes each block.
    return forward(img, txt, scale, bias), (img, txt, scale, bias)

  def ring_sum_bwd(residuals, cotangents):
    img, txt, scale, bias = residuals
    ct, _ = cotangents  # The row stats are metrics, not differentiated.

    def block_grads(txt, has_positives):
      _, vjp = jax.vjp(lambda *args: block(*args, has_positives)[0],
                       img, txt, scale, bias)
      dimg, dtxt, dscale, dbias = vjp(ct)
      # Summed over the hops in float32, as the dense loss's one matmul would.
      return (dimg.astype(jnp.float32), dtxt.astype(jnp.float32),
              dscale, dbias)

    dimg, dtxt, dscale, dbias = block_grads(txt, True)

    def hop(_, carry):
      txt, dtxt, dimg, dscale, dbias = carry
      # The text chunk travels with the gradient accumulated for it so far.
      txt, dtxt = rotate(txt), rotate(dtxt)
      gimg, gtxt, gscale, gbias = block_grads(txt, False)
      return txt, dtxt + gtxt, dimg + gimg, dscale + gscale, dbias + gbias

    if ring_size > 1:
      _, dtxt, dimg, dscale, dbias = jax.lax.fori_loop(
          0, ring_size - 1, hop, (txt, dtxt, dimg, dscale, dbias))
      # We now hold device k + 1's texts and their finished gradient: one
      # more hop takes it home.
      dtxt = rotate(dtxt)
    return dimg.astype(img.dtype), dtxt.astype(txt.dtype), dscale, dbias

  ring_sum.defvjp(ring_sum_fwd, ring_sum_bwd)

  def local_loss(img, txt, scale, bias):
    if axes:
      # Make the replicated scalars per-device values, as custom_vjp needs
      # its cotangents typed like its inputs; autodiff then sums their
      # per-device gradients over the ring (pcast's transpose is a psum).
      scale, bias = (jax.lax.pcast(x, axes, to="varying") for x in (scale, bias))
    total, (positive, max_negative) = ring_sum(img, txt, scale, bias)
    if axes:
      total = jax.lax.psum(total, axes)
    return (total / global_batch,
            {"positive_logits": jax.lax.stop_gradient(positive),
             "max_negative_logits": jax.lax.stop_gradient(max_negative)})

  batch = P(axes or None)
  return jax.shard_map(
      local_loss, mesh=mesh,
      in_specs=(batch, batch, P(), P()),
      out_specs=(P(), {"positive_logits": batch, "max_negative_logits": batch}),
  )(zimg, ztxt, jnp.asarray(logit_scale, jnp.float32),
    jnp.asarray(logit_bias, jnp.float32))
