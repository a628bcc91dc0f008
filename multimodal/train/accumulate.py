"""Gradient accumulation: one global batch as `k` sequential microbatches.

`config.grad_accum_steps = k` trades time for memory: activations live for
one microbatch at a time, and the update equals the large-batch step's
(tests/test_scale.py checks it for CLIP, SigLIP, DiT and the VLM). That holds because

  * a loss that is a mean of per-example terms has a gradient that is the
    mean of its microbatches' (equal sizes); a task whose loss couples the
    examples (contrastive losses) overrides `Task.loss_and_grads` instead
    (CLIP: the embedding cache of open_clip's --accum-freq / GradCache);
  * randomness is drawn for the whole batch before the split
    (`Task.random_draws`), so example i sees the same noise either way.

Microbatch j holds rows j, j+k, j+2k, ...: every device keeps its own rows
and takes part in every microbatch, rather than one device's block of rows
being one microbatch that only it would compute.

`config.grad_accum_unroll = True` writes the k microbatches out one after
another instead of as a loop (`lax.scan(unroll=True)`): the same arithmetic,
but XLA schedules and fuses across microbatches and drops the loop's carry
copies. It is a speed setting, not a memory one: XLA may then keep more than
one microbatch's activations alive. On this CPU, DiT's step at batch 64 is
fastest as two unrolled halves (docs/performance.md): a half batch's
activations stay in cache, which the whole batch's do not.

`in_microbatches` does the same for a forward pass alone: the DiT sampler
calls its model on the guided (doubled) batch in parts of at most
`config.sample_microbatch_size` rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def _constrain(x, leading: int):
  """Keeps the batch axis (after `leading` axes) split over the data axes."""
  axes = (None,) * leading + ("batch",) + (None,) * (x.ndim - leading - 1)
  return nn.with_logical_constraint(x, axes)


def split(batch, k: int):
  """[B, ...] leaves -> [k, B/k, ...]; microbatch j = rows j, j+k, ..."""
  def one(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return _constrain(jnp.swapaxes(x, 0, 1), 1)
  return jax.tree.map(one, batch)


def merge(x):
  """The inverse of `split` for one array: [k, B/k, ...] -> [B, ...]."""
  k, b = x.shape[:2]
  return _constrain(jnp.swapaxes(x, 0, 1).reshape((k * b,) + x.shape[2:]), 0)


def mean_loss_and_grads(loss_fn, params, batch, rng, k: int, unroll: bool = False):
  """((loss, metrics), grads) of `loss_fn(params, batch, rng)`, averaged over
  k microbatches computed one after another (a scan, unrolled if `unroll`);
  k = 1 is the plain `jax.value_and_grad`. Microbatch j gets
  `fold_in(rng, j)`."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(params, batch, rng)
  micro = split(batch, k)

  def step(total, xs):
    j, microbatch = xs
    out = grad_fn(params, microbatch, jax.random.fold_in(rng, j))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first, rng))
  total, _ = jax.lax.scan(step, zeros, (jnp.arange(k), micro), unroll=unroll)
  return jax.tree.map(lambda x: x / k, total)


def count_for_size(batch: int, max_size: int) -> int:
  """The fewest microbatches that split `batch` rows evenly into parts of at
  most `max_size` rows (max_size 0: one, the whole batch)."""
  if max_size <= 0 or batch <= max_size:
    return 1
  return next(k for k in range(-(-batch // max_size), batch + 1) if batch % k == 0)


def in_microbatches(fn, k: int):
  """`fn(*batched)` computed on k microbatches one after another, written out,
  and merged back into the batch's row order: the same values for a
  per-example `fn` (a forward pass), but on this CPU a smaller working set
  (docs/performance.md). Every argument and output leaf is batched on axis 0;
  the microbatches are `split`'s, so each device keeps its rows."""
  if k == 1:
    return fn

  def run(*args):
    micro = split(args, k)
    outs = [fn(*jax.tree.map(lambda x, j=j: x[j], micro)) for j in range(k)]
    return jax.tree.map(lambda *parts: merge(jnp.stack(parts)), *outs)
  return run
