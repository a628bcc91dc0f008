"""TFDS / TFRecords -> tf.data -> global jax.Arrays sharded on the batch axis.

The order of training examples is a pure function of (seed, example index), so
a resumed run skips exactly the examples it has already seen and sees the rest
in the same order as an uninterrupted run.

A training record that cannot be used (an image that does not decode, an
empty caption: any record whose pp fails) is skipped; images and captions
that can be fixed are converted or cut, and counted (preprocess.COUNT_KEYS).
Each shard's position is counted in records of its raw stream, so skipping
does not disturb resuming: `StreamTracker` follows the positions and the
counts batch by batch, saves them in checkpoints, and stops a run whose
skipped fraction is over `input.max_skipped_fraction`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf

from multimodal.data import errors, preprocess
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


# Host-only columns of a training batch: each example's index in its shard's
# raw stream, and preprocess's per-example record counters. They stay numpy
# rows of this process (iterate_global) and StreamTracker.observe takes them
# out of the batch before it goes to the train step.
STREAM_INDEX = "_stream_index"


def is_host_only(key: str) -> bool:
  return key == STREAM_INDEX or key.startswith(preprocess.COUNT_PREFIX)


def train_dataset(source: Source, *, split: str, pp_fn: Callable,
                  local_batch_size: int, seed: int,
                  start_positions: Sequence[int] | None = None,
                  shuffle_buffer: int = 10_000, process_index: int = 0,
                  process_count: int = 1, filter_fn: Callable | None = None,
                  shards: Shards | None = None) -> tf.data.Dataset:
  """An infinite, shuffled, batched stream of this process's examples.

  Each of this process's `shards` (default: one per process) reads its own
  share of the split, shuffled with its own seed; a local batch is their
  blocks of rows side by side. `shuffle_buffer` is shared among all shards.
  `start_positions` (one per shard of this process, in `shards.indices`
  order; StreamTracker.start_positions) counts the records of each shard's
  raw stream already consumed; they are skipped before any decoding, so
  resuming costs a file read, not a pp pass (default: every shard from its
  beginning; StreamTracker.restore turns old checkpoints' positions into
  these). `filter_fn` drops raw examples before the shuffle, so
  the kept stream (and the positions counted in it) is deterministic too.

  A record whose pp fails (an undecodable image, an empty caption) is
  skipped; the examples carry STREAM_INDEX and the COUNT_KEYS for
  StreamTracker. Records that do preprocess give exactly the examples, in
  the order and with the `_seed` they had before records were ever skipped.
  Before returning, each shard is checked to hold a record that preprocesses
  (else its stream would search for one forever): a DataError names the
  first failure when none does.
  """
  shards = shards or Shards((process_index,), process_count)
  if local_batch_size % len(shards.indices):
    raise ValueError(f"local batch size {local_batch_size} does not split into "
                     f"{len(shards.indices)} equal blocks of rows.")
  if start_positions is None:
    start_positions = [0] * len(shards.indices)
  start_positions = [int(p) for p in start_positions]
  if len(start_positions) != len(shards.indices) or min(start_positions) < 0:
    raise ValueError(f"start_positions {start_positions} must be one "
                     f"non-negative position per shard {shards.indices}.")
  rows = local_batch_size // len(shards.indices)
  global_batch = rows * shards.count

  def raw(shard):
    ds = source.read(split, process_index=shard, process_count=shards.count)
    return ds if filter_fn is None else ds.filter(filter_fn)

  def numbered(shard):
    """Adds the stream index, the RNG seed and zeroed counters."""
    def add(i, example):
      # Each example's RNG seed is its position in the global stream.
      example = _with_example_seed(seed)(
          i // rows * global_batch + shard * rows + i % rows, example)
      example[STREAM_INDEX] = i
      for key in preprocess.COUNT_KEYS:
        example[key] = tf.constant(0, tf.int32)
      return example
    return add

  raws = {shard: raw(shard) for shard in shards.indices}
  firsts = {shard: ds.enumerate().map(numbered(shard)) for shard, ds in raws.items()}
  # Traced once, not once per shard (and check): every stream's examples
  # have the same structure.
  pp_fn = tf.function(pp_fn, input_signature=[firsts[shards.indices[0]].element_spec],
                      autograph=False)
  _check_every_shard_preprocesses(firsts, pp_fn, count=shards.count,
                                  name=f"{source.name}[{split}]")

  def stream(shard, start):
    ds = raws[shard].repeat().shuffle(max(1, shuffle_buffer // shards.count),
                                      seed=seed + shard, reshuffle_each_iteration=True)
    ds = ds.enumerate().map(numbered(shard)).skip(start)
    # About one window in flight per core, among all this process's shards.
    windows = max(1, _usable_cpus() // len(shards.indices))
    return _preprocess_skipping_failures(ds, pp_fn, windows)

  streams = [stream(shard, start) for shard, start in zip(shards.indices, start_positions)]
  if len(streams) == 1:
    ds = streams[0]
  else:
    order = tf.data.Dataset.range(len(streams)).flat_map(
        lambda s: tf.data.Dataset.from_tensors(s).repeat(rows))
    ds = tf.data.Dataset.choose_from_datasets(streams, order.repeat())
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


# Examples a training stream preprocesses together, in one small dataset
# whose pp failures are ignored: a dataset per example would cost more than
# many a pp.
_SKIP_WINDOW = 16


def _preprocess_skipping_failures(ds: tf.data.Dataset, pp_fn: Callable,
                                  windows: int) -> tf.data.Dataset:
  """`ds.map(pp_fn)` in parallel and in order, without the examples whose
  pp fails; STREAM_INDEX and the COUNT_KEYS (zeroed if the pp drops them)
  are kept.

  Only the pp's own failures are ignored (each window of examples is read
  in full before its pp runs): an error reading the shards still ends the
  run, named by iterate_global. Every window yields at most _SKIP_WINDOW
  examples, one window after the other, so the order is kept; `windows`
  windows are preprocessed in parallel.
  """
  def with_host_columns(example):
    zeroed = {key: example[key] for key in preprocess.COUNT_KEYS}
    out = pp_fn(example)
    if not isinstance(out, dict):
      raise preprocess.PreprocessError(f"a training pp must return a dict, got {out}")
    return {**zeroed, **out, STREAM_INDEX: example[STREAM_INDEX]}

  def attempt(window):
    return tf.data.Dataset.zip(window).map(with_host_columns).ignore_errors()

  return ds.window(_SKIP_WINDOW).interleave(
      attempt, cycle_length=windows, block_length=_SKIP_WINDOW,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _tagged(shard: int) -> Callable:
  return lambda example: (tf.constant(shard, tf.int64), example)


def _check_every_shard_preprocesses(firsts: dict[int, tf.data.Dataset],
                                    pp_fn: Callable, *, count: int, name: str) -> None:
  """Raises a DataError unless every shard (its records, in one pass) has
  a record that preprocesses, without which its stream would search forever.
  Reads up to the first such record of each shard: normally one each."""
  tagged = [ds.map(_tagged(shard)) for shard, ds in firsts.items()]
  merged = tf.data.Dataset.choose_from_datasets(
      tagged, tf.data.Dataset.range(len(tagged)).repeat(),
      stop_on_empty_dataset=False) if len(tagged) > 1 else tagged[0]
  pending = {shard: (0, None) for shard in firsts}  # Failures, the first's text.
  iterator = iter(merged)
  while pending:
    try:
      shard, example = next(iterator)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      raise errors.DataError(
          f"reading {name} failed: {_op_error_text(e)}. A shard file is corrupt "
          "or not of the expected format.") from None
    shard = int(shard)
    if shard not in pending:
      continue
    try:
      pp_fn(example)
    except tf.errors.OpError as e:
      failed, first_error = pending[shard]
      pending[shard] = (failed + 1, first_error or _op_error_text(e))
      continue
    del pending[shard]
  if not pending:
    return
  shard, (failed, first_error) = min(pending.items())
  what = f"shard {shard} of {count} of {name}"
  if not failed:
    raise errors.DataError(
        f"{what} has no training records (after the task's filter, if any): "
        "the split is empty or too small to give every data-parallel shard "
        "a share. Use a larger split or fewer data-parallel devices.")
  raise errors.DataError(
      f"none of the {failed} records of {what} can be preprocessed, so "
      f"training has nothing to read. The first fails with: {first_error}. "
      "Check that input.data points at the intended dataset and that "
      "input.pp fits its records (e.g. the image and caption keys).")


def _op_error_text(e: tf.errors.OpError) -> str:
  """The cause in a TF error, without TF's node, function and iterator names."""
  lines = [line for line in e.message.split("\n\t [[")[0].splitlines() if line.strip()]
  text = lines[-1].strip() if lines else e.message.strip()
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(r"^.*?Iterator::[\w:]+: ", "", text)
  return re.sub(r"\s*\[Op:\w+\].*$", "", text)


# The skipped fraction is taken of at least this many records read, so that
# a few bad records early in a run do not stop it: with the default limit,
# a run stops once more than 10 of its first 1,000 records were skipped.
MIN_RECORDS_FOR_SKIP_CHECK = 1_000
DEFAULT_MAX_SKIPPED_FRACTION = 0.01  # config.input.max_skipped_fraction
# Columns of StreamTracker's per-shard table, as named in its JSON.
_POSITION, _DELIVERED, _CONVERTED, _TRUNCATED = range(4)
_COLUMNS = ("positions", "delivered", "converted_images", "truncated_captions")


class StreamTracker:
  """Where each shard's training stream is, and what it skipped or fixed.

  Per shard of the whole global batch (Shards.count of them) it counts the
  records of the shard's raw stream consumed (its position: where a resumed
  stream starts), the examples delivered, and how many of those had their
  image converted or their caption cut. The trainer:

    tracker = StreamTracker.restore(data_position_or_None, shards, local_batch)
    ds = task.train_dataset(start_positions=tracker.start_positions(), ...)
    batch = tracker.observe(next(batches))    # every step, before the step
    metrics.update(tracker.metrics())         # at log steps
    tracker.check(config.input.max_skipped_fraction)
    data_position = tracker.to_json()         # at checkpoint steps

  In a multi-process run, metrics(), check() and to_json() gather every
  process's shards (a collective): every process calls them at the same
  steps. Counts are cumulative over resumes: they are in the JSON too.
  """

  def __init__(self, shards: Shards, local_batch_size: int, table: np.ndarray,
               carried: dict[str, int] | None = None):
    if local_batch_size % len(shards.indices):
      raise ValueError(f"local batch size {local_batch_size} does not split into "
                       f"{len(shards.indices)} equal blocks of rows.")
    self.shards = shards
    self.rows = local_batch_size // len(shards.indices)
    self._table = np.array(table, np.int64).reshape(shards.count, len(_COLUMNS))
    # Counts of an earlier run with another shard layout (see restore).
    self._carried = np.array([int((carried or {}).get(c, 0)) for c in _COLUMNS], np.int64)
    self._global = None  # The gathered table, until the next observe().

  @classmethod
  def restore(cls, data_position: dict | None, shards: Shards,
              local_batch_size: int) -> "StreamTracker":
    """The tracker of a checkpoint's `data_position` (to_json()); None or
    {} starts at the beginning. An old run's {"examples_per_process": N}
    (it skipped no records) starts each of this process's shards at N //
    their number. A checkpoint of another shard count (the mesh changed)
    cannot resume the same streams: each shard then starts as far in as
    the examples delivered per shard so far, like old runs did, and the
    counts so far carry over."""
    data_position = data_position or {}
    if "shards" not in data_position:
      n = int(data_position.get("examples_per_process", 0)) // len(shards.indices)
      table = np.zeros((shards.count, len(_COLUMNS)), np.int64)
      table[:, _POSITION] = table[:, _DELIVERED] = n
      return cls(shards, local_batch_size, table)
    saved = data_position["shards"]
    count = int(saved["count"])
    try:
      table = np.array([[int(v) for v in saved[c]] for c in _COLUMNS], np.int64).T
    except (KeyError, TypeError, ValueError) as e:
      raise errors.DataError(
          f"the checkpoint's data position {data_position} is not one "
          f"StreamTracker.to_json wrote ({type(e).__name__}: {e}).") from None
    if table.shape != (count, len(_COLUMNS)):
      raise errors.DataError(f"the checkpoint's data position {data_position} "
                             f"does not hold {count} shards.")
    carried = {c: int(v) for c, v in data_position.get("carried", {}).items()}
    if count == shards.count:
      return cls(shards, local_batch_size, table, carried)
    before = table.sum(0) + np.array([carried.get(c, 0) for c in _COLUMNS])
    start = int(before[_DELIVERED]) // shards.count
    print(f"The checkpoint's data stream has {count} shards and this mesh "
          f"{shards.count}: each shard starts {start} records in, and the data "
          "order differs from an uninterrupted run's.", flush=True)
    table = np.zeros((shards.count, len(_COLUMNS)), np.int64)
    table[:, _POSITION] = table[:, _DELIVERED] = start
    return cls(shards, local_batch_size, table,
               dict(zip(_COLUMNS, (before - table.sum(0)).tolist())))

  def start_positions(self) -> tuple[int, ...]:
    """Records consumed per shard of this process (train_dataset's
    start_positions)."""
    return tuple(int(self._table[d, _POSITION]) for d in self.shards.indices)

  def observe(self, batch: dict) -> dict:
    """Counts a local batch of train_dataset (its rows are this process's
    shards' blocks, in order) and takes the host-only columns out of it:
    returns the same dict, ready for the train step."""
    if STREAM_INDEX not in batch:
      raise ValueError(f"the batch has no {STREAM_INDEX!r}: it does not come "
                       "from pipeline.train_dataset, or was observed already.")
    blocks = len(self.shards.indices)

    def per_block(x):
      return np.asarray(x).reshape(blocks, self.rows)

    index = per_block(batch.pop(STREAM_INDEX))
    counts = {key: per_block(batch.pop(key)).sum(1)
              for key in [k for k in batch if k.startswith(preprocess.COUNT_PREFIX)]}
    zero = np.zeros(blocks, np.int64)
    for j, d in enumerate(self.shards.indices):
      position = int(index[j, -1]) + 1
      if position < self._table[d, _POSITION] + self.rows:
        raise errors.DataError(
            f"shard {d}'s batch ends at record {position - 1} of its stream, "
            f"which the tracker has at {self._table[d, _POSITION]}: the "
            "dataset was not started at tracker.start_positions().")
      self._table[d, _POSITION] = position
      self._table[d, _DELIVERED] += self.rows
      self._table[d, _CONVERTED] += counts.get(preprocess.CONVERTED_IMAGES, zero)[j]
      self._table[d, _TRUNCATED] += counts.get(preprocess.TRUNCATED_TEXTS, zero)[j]
    self._global = None
    return batch

  def _gathered(self) -> np.ndarray:
    """The table with every process's shards (each process has the newest
    counts of its own; counts only grow, so the largest are the newest)."""
    if self._global is None:
      self._global = _allgather(self._table).max(0)
    return self._global

  def _totals(self) -> dict[str, int]:
    return dict(zip(_COLUMNS, (self._gathered().sum(0) + self._carried).tolist()))

  def to_json(self) -> dict:
    """The data position to save in a checkpoint (all shards)."""
    table = self._gathered()
    local = list(self.shards.indices)
    return {
        # What old checkpoints held, and still this process's examples.
        "examples_per_process": int(self._table[local, _DELIVERED].sum()),
        "shards": {"count": self.shards.count,
                   **{c: table[:, i].tolist() for i, c in enumerate(_COLUMNS)}},
        "carried": dict(zip(_COLUMNS, self._carried.tolist())),
    }

  def metrics(self) -> dict[str, float]:
    """data/... scalars over all shards, counted since the run began."""
    totals = self._totals()
    read, delivered = totals["positions"], totals["delivered"]
    skipped = read - delivered
    return {"data/records_read": read, "data/skipped_records": skipped,
            "data/skipped_fraction": skipped / max(read, 1),
            "data/converted_images": totals["converted_images"],
            "data/truncated_captions": totals["truncated_captions"]}

  def check(self, max_skipped_fraction: float) -> None:
    """Raises a DataError when more than `max_skipped_fraction` of the
    records read were skipped (the fraction taken of at least
    MIN_RECORDS_FOR_SKIP_CHECK records)."""
    limit = max_skipped_fraction
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1:
      raise ValueError(f"config.input.max_skipped_fraction={limit!r} must be "
                       "a number in [0, 1] (e.g. 0.01).")
    totals = self._totals()
    read = totals["positions"]
    skipped = read - totals["delivered"]
    if skipped / max(read, MIN_RECORDS_FOR_SKIP_CHECK) <= limit:
      return
    raise errors.DataError(
        f"{skipped:,} of the {read:,} training records read so far "
        f"({skipped / read:.2%}) were skipped because their preprocessing "
        "failed (an image that does not decode, an empty caption, ...), more "
        f"than config.input.max_skipped_fraction={limit} allows (below "
        f"{MIN_RECORDS_FOR_SKIP_CHECK:,} records read, the fraction is taken "
        f"of {MIN_RECORDS_FOR_SKIP_CHECK:,}). Clean or regenerate the dataset "
        "(an evaluation pass over the split, pipeline.eval_dataset, stops at "
        "the first bad record and names its problem), fix config.input.pp if "
        "it does not fit the records, or raise --config.input.max_skipped_fraction; "
        "a rerun resumes from the last checkpoint.")


def _allgather(table: np.ndarray) -> np.ndarray:
  """[process_count, ...] of every process's int64 `table` (a collective)."""
  if jax.process_count() == 1:
    return table[None]
  from jax.experimental import multihost_utils
  # 31-bit halves: device integers are 32-bit unless x64 is on.
  halves = np.stack([table >> 31, table & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  return (gathered[:, 0] << 31) | gathered[:, 1]


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
    return ds.map(lambda ex: {**_without_counts(ex), "_mask": tf.constant(real)})

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
  ds = ds.map(lambda index, ex: {**_without_counts(pp_fn(ex)), "_index": tf.cast(index, tf.int32), "_mask": tf.constant(True)},
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


def _without_counts(example: dict) -> dict:
  """An evaluation example without training-stream counters (none are
  added to evaluation streams; this keeps their batches as they were)."""
  return {k: v for k, v in example.items() if not k.startswith(preprocess.COUNT_PREFIX)}


def _pad_batch(batch, size):
  def pad(x):
    missing = size - tf.shape(x)[0]
    paddings = [[0, missing]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, paddings)
  return tf.nest.map_structure(pad, batch)


def to_global_arrays(local_batch: dict, sharding) -> dict:
  """Assembles each process's rows into one global jax.Array per key.

  Strings (captions kept for inspection) cannot live on a device; they stay
  as this process's numpy rows, as do the host-only columns of a training
  batch (STREAM_INDEX and the record counters, for StreamTracker).
  """
  def to_global(x):
    x = np.asarray(x)
    if x.dtype.kind in "OSU":
      return x
    return jax.make_array_from_process_local_data(sharding, x)
  return {key: (jax.tree.map(np.asarray, value) if is_host_only(key)
                else jax.tree.map(to_global, value))
          for key, value in local_batch.items()}


def iterate_global(ds: tf.data.Dataset, sharding, *, what: str,
                   prefetch: int = 2) -> Iterator[dict]:
  """Yields global batches, moved to devices by a background thread.

  A tf.data failure (most often an image record that does not decode) becomes
  a DataError naming the dataset and the cause, not a TF traceback. Closing
  the generator (or its consumer failing) stops and joins the thread: one
  left reading tf.data while the interpreter exits can abort the process
  ("terminate called without an active exception") after the run is done.
  """
  buffer: queue.Queue = queue.Queue(maxsize=prefetch)
  done = object()
  stop = threading.Event()

  def put(item) -> bool:
    """Waits for room in the buffer; False once the consumer has stopped."""
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for local_batch in ds.as_numpy_iterator():
        if not put(to_global_arrays(local_batch, sharding)):
          return
      put(done)
    except tf.errors.OpError as e:
      put(errors.DataError(
          f"reading {what} failed: {e.message.strip().splitlines()[0]}. A "
          "record is corrupt or not of the expected format (for images: not a "
          "decodable JPEG/PNG). Regenerate or clean the dataset, or drop the "
          "record from the shards."))
    except BaseException as e:  # Surface any other failure in the consumer.
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=60)
