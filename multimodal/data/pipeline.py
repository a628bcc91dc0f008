"""TFDS / TFRecords -> tf.data -> global jax.Arrays sharded on the batch axis.

The order of training examples is a pure function of (seed, example index), so
a resumed run skips exactly the examples it has already seen and sees the rest
in the same order as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from multimodal.data import errors
from multimodal.data.sources import Source

# TensorFlow only feeds the input pipeline; it must never grab an accelerator
# that JAX needs.
tf.config.set_visible_devices([], "GPU")


def _with_example_seed(seed: int):
  """Adds `_seed`, the stateless RNG seed of a random pp op for this example."""
  def add(index, example):
    example = dict(example)
    example["_seed"] = tf.stack([tf.constant(seed, tf.int64), index])
    return example
  return add


def is_single_object(example) -> tf.Tensor:
  """Predicate on raw shapes-world examples: the scene holds one object."""
  return tf.equal(example["num_objects"], 1)


@dataclasses.dataclass(frozen=True)
class Shards:
  """Which blocks of rows of the global batch this process feeds.

  The global batch is `count` equal blocks of rows, block d always filled
  from its own stream (shard d of the split). The trainer makes one block per
  data-parallel device, so the global batches, and hence the trained
  parameters, depend on the mesh but not on how many processes share it.
  """
  indices: tuple[int, ...]  # This process's blocks, in row order.
  count: int

  @classmethod
  def of(cls, batch_sharding) -> "Shards":
    """The blocks a batch sharding gives this process's devices: the rows
    that jax.make_array_from_process_local_data expects from it."""
    count = math.prod(batch_sharding.mesh.shape[a] for a in
                      _flat_axes(batch_sharding.spec[0]))
    rows = batch_sharding.addressable_devices_indices_map((count,))
    return cls(tuple(sorted({index[0].start or 0 for index in rows.values()})), count)


def _flat_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def train_dataset(source: Source, *, split: str, pp_fn: Callable,
                  local_batch_size: int, seed: int, start_example: int = 0,
                  shuffle_buffer: int = 10_000, process_index: int = 0,
                  process_count: int = 1, filter_fn: Callable | None = None,
                  shards: Shards | None = None) -> tf.data.Dataset:
  """An infinite, shuffled, batched stream of this process's examples.

  Each of this process's `shards` (default: one per process) reads its own
  share of the split, shuffled with its own seed; a local batch is their
  blocks of rows side by side. `shuffle_buffer` is shared among all shards.
  `start_example` counts this process's examples already consumed; they are
  skipped before any decoding, so resuming costs a file read, not a pp pass.
  `filter_fn` drops raw examples before the shuffle, so the kept stream (and
  the count `start_example` refers to) is deterministic too.
  """
  shards = shards or Shards((process_index,), process_count)
  if local_batch_size % len(shards.indices):
    raise ValueError(f"local batch size {local_batch_size} does not split into "
                     f"{len(shards.indices)} equal blocks of rows.")
  rows = local_batch_size // len(shards.indices)
  global_batch = rows * shards.count

  def stream(shard):
    ds = source.read(split, process_index=shard, process_count=shards.count)
    if filter_fn is not None:
      ds = ds.filter(filter_fn)
    ds = ds.repeat().shuffle(max(1, shuffle_buffer // shards.count),
                             seed=seed + shard, reshuffle_each_iteration=True)
    # Each example's RNG seed is its position in the global stream.
    ds = ds.enumerate().map(lambda i, example: (
        i // rows * global_batch + shard * rows + i % rows, example))
    ds = ds.map(_with_example_seed(seed))
    return ds.skip(start_example // len(shards.indices))

  streams = [stream(shard) for shard in shards.indices]
  if len(streams) == 1:
    ds = streams[0]
  else:
    order = tf.data.Dataset.range(len(streams)).flat_map(
        lambda s: tf.data.Dataset.from_tensors(s).repeat(rows))
    ds = tf.data.Dataset.choose_from_datasets(streams, order.repeat())
  ds = ds.map(pp_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(source: Source, *, split: str, pp_fn: Callable,
                 local_batch_size: int, filter_fn: Callable | None = None,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """One pass over a split, padded to full batches; `_mask` marks real rows.

  Padding (rather than dropping the remainder) keeps every example in the
  metric while every batch keeps the one static shape jit compiled for.
  With several processes, every one yields as many batches as the one with
  the most examples (a filter keeps different counts of different shares),
  padding with fully masked batches: a global batch is assembled from all.
  """
  raw = source.read(split, process_index=process_index,
                    process_count=process_count)
  ds = raw if filter_fn is None else raw.filter(filter_fn)
  num_batches = None
  if process_count > 1:
    from jax.experimental import multihost_utils
    count = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
    most = int(np.max(multihost_utils.process_allgather(np.int64(count))))
    num_batches = max(1, -(-most // local_batch_size))

  def prepare(ds, real):
    ds = ds.enumerate().map(_with_example_seed(0))
    ds = ds.map(pp_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(lambda ex: {**ex, "_mask": tf.constant(real)})

  if num_batches is None:
    ds = prepare(ds, True).batch(local_batch_size, drop_remainder=False)
    ds = ds.map(lambda batch: _pad_batch(batch, local_batch_size))
  else:  # Masked copies of this share's first example fill the batches up.
    filler = prepare((ds if count else raw).take(1), False).cache().repeat()
    ds = prepare(ds, True).concatenate(filler)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.take(num_batches)
  return ds.prefetch(tf.data.AUTOTUNE)


def indexed_eval_dataset(ds: tf.data.Dataset, *, pp_fn: Callable,
                         local_batch_size: int, num_examples: int | None = None,
                         process_index: int = 0,
                         process_count: int = 1) -> tf.data.Dataset:
  """Like eval_dataset, from a whole split that every process reads, each
  example tagged with `_index`, its position in the split.

  Every process enumerates the same stream and preprocesses only its own
  rows (round robin), so gathered results are put back in split order by
  `_index`: what embeddings aligned with host-side data (file paths,
  captions) need, on any number of hosts. With several processes,
  `num_examples` (the split's size) must be given: every process then yields
  the same number of batches, padding with fully masked ones, as the
  collective that assembles a global batch requires.
  """
  ds = ds.enumerate().shard(process_count, process_index)
  ds = ds.map(lambda index, ex: {**pp_fn(ex), "_index": tf.cast(index, tf.int32), "_mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=False)
  ds = ds.map(lambda batch: _pad_batch(batch, local_batch_size))
  if process_count > 1:
    if num_examples is None:
      raise ValueError("indexed_eval_dataset: several processes need num_examples.")
    per_process = -(-num_examples // process_count)
    num_batches = max(1, -(-per_process // local_batch_size))
    empty = tf.nest.map_structure(
        lambda spec: tf.zeros([local_batch_size, *spec.shape[1:]], spec.dtype),
        ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
  return ds.prefetch(tf.data.AUTOTUNE)


def _pad_batch(batch, size):
  def pad(x):
    missing = size - tf.shape(x)[0]
    paddings = [[0, missing]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, paddings)
  return tf.nest.map_structure(pad, batch)


def to_global_arrays(local_batch: dict, sharding) -> dict:
  """Assembles each process's rows into one global jax.Array per key.

  Strings (captions kept for inspection) cannot live on a device; they stay
  as this process's numpy rows.
  """
  def to_global(x):
    x = np.asarray(x)
    if x.dtype.kind in "OSU":
      return x
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(to_global, local_batch)


def iterate_global(ds: tf.data.Dataset, sharding, *, what: str,
                   prefetch: int = 2) -> Iterator[dict]:
  """Yields global batches, moved to devices by a background thread.

  A tf.data failure (most often an image record that does not decode) becomes
  a DataError naming the dataset and the cause, not a TF traceback.
  """
  buffer: queue.Queue = queue.Queue(maxsize=prefetch)
  done = object()

  def produce():
    try:
      for local_batch in ds.as_numpy_iterator():
        buffer.put(to_global_arrays(local_batch, sharding))
      buffer.put(done)
    except tf.errors.OpError as e:
      buffer.put(errors.DataError(
          f"reading {what} failed: {e.message.strip().splitlines()[0]}. A "
          "record is corrupt or not of the expected format (for images: not a "
          "decodable JPEG/PNG). Regenerate or clean the dataset, or drop the "
          "record from the shards."))
    except BaseException as e:  # Surface any other failure in the consumer.
      buffer.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  while True:
    item = buffer.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
