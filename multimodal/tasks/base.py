"""The small interface between a task and the generic trainer.

The trainer knows nothing of any model: it asks a task for initial params
(boxed with logical axis names), a loss on a global batch, a training data
stream, and evaluators. Everything else (mesh, optimizer, checkpoints, metrics,
progress) is the trainer's.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

import jax
import tensorflow as tf

from multimodal.config import config_lib
from multimodal.data import pipeline, sources
from multimodal.models import layers
from multimodal.parallel import sharding
from multimodal.tasks import config_checks
from multimodal.train import accumulate, optim


class Task(abc.ABC):
  """Base class: subclasses define the model, the loss and the evaluators."""

  def __init__(self, config):
    self.config = config
    # Before any data or weights are read, let alone compiled: image sizes
    # that the model's patch divides, and runs or weights to start from that
    # exist (also checked by config_lib.validate when a command line parses).
    config_checks.check_image_patch(config)
    config_checks.check_init_paths(config)
    self.source = sources.open_source(
        config.input.data, data_dir=config.input.get("data_dir"),
        shapes_world=config.input.get("shapes_world"))

  @property
  def remat(self) -> str:
    """`config.remat`: the rematerialisation policy of every transformer
    block (a layers.REMAT_POLICIES name; "none" keeps all activations)."""
    value = self.config.get("remat") or "none"
    try:
      return layers.remat_policy_name(value)
    except ValueError:
      raise config_lib.ConfigError(
          f"config.remat={value!r} is not one of {sorted(layers.REMAT_POLICIES)}.") from None

  @abc.abstractmethod
  def init(self, rng: jax.Array):
    """Returns params whose leaves are nn.LogicallyPartitioned."""

  @abc.abstractmethod
  def loss_fn(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(scalar loss, dict of scalar metrics) on one global batch."""

  # {config.evals.NAME.type: factory(self, name, cfg, mesh, workdir) -> evaluator}.
  # tasks.EVALUATOR_TYPES names the same types, so that a config is checked
  # without importing a task's model code (tests/test_tasks_table.py).
  EVALUATORS: dict[str, Callable] = {}

  def evaluators(self, mesh, workdir: str | None = None) -> list:
    """Objects with `.name` and `.run(params) -> dict[str, float]`, one per
    entry of config.evals, built by the factory its `type` names.

    `workdir` is where evaluators that write files (sample grids) put them;
    None when there is no run directory.
    """
    result = []
    for name, cfg in sorted(self.config.evals.items()):
      if cfg.type not in self.EVALUATORS:
        raise config_lib.ConfigError(
            f"config.evals.{name}.type={cfg.type!r}; this task knows "
            f"{', '.join(map(repr, self.EVALUATORS))}.")
      result.append(self.EVALUATORS[cfg.type](self, name, cfg, mesh, workdir))
    return result

  @abc.abstractmethod
  def train_pp(self) -> Callable:
    """The per-example preprocessing function of the training stream."""

  def num_train_examples(self) -> int | None:
    try:
      return self.source.num_examples(self.config.input.split)
    except Exception:  # Sources without split sizes (TFRecord shards).
      return None

  def random_draws(self, batch: dict, rng: jax.Array) -> dict:
    """The batch plus the per-example randomness loss_fn uses (noise,
    timesteps, ...), drawn for the whole global batch before it is split
    into microbatches, so that accumulation cannot change what any example
    sees. None by default."""
    del rng
    return batch

  def loss_and_grads(self, params, batch: dict, rng: jax.Array, microbatches: int,
                     freeze: str | None = None):
    """((loss, metrics), grads) on one global batch, computed in
    `microbatches` sequential pieces. Exact for losses that are means of
    per-example terms; a loss coupling the examples overrides this. The
    parameters `freeze` names get zero gradients, and cost no backward work
    (optim.without_frozen_gradients)."""
    return accumulate.mean_loss_and_grads(
        optim.without_frozen_gradients(self.loss_fn, freeze), params, batch, rng,
        microbatches, unroll=bool(self.config.get("grad_accum_unroll")))

  def pretrained_params(self) -> list[tuple[str, dict]]:
    """(where from, nested dict of host arrays) pairs that replace parts of a
    fresh init: a subset of the param tree, same nesting and shapes."""
    return []

  def train_filter(self) -> Callable | None:
    """A predicate on raw training examples; only those it keeps are used."""
    return None

  def train_dataset(self, *, local_batch_size: int, process_index: int,
                    process_count: int, shards: pipeline.Shards | None = None,
                    start_positions=None) -> tf.data.Dataset:
    """The training stream (pipeline.train_dataset): from the beginning, or
    from `start_positions` (pipeline.StreamTracker.start_positions(): one
    per shard of this process)."""
    return pipeline.train_dataset(
        self.source, split=self.config.input.split, pp_fn=self.train_pp(),
        filter_fn=self.train_filter(),
        local_batch_size=local_batch_size, seed=self.config.seed,
        start_positions=start_positions,
        shuffle_buffer=self.config.input.shuffle_buffer,
        process_index=process_index, process_count=process_count, shards=shards)

  def eval_batches(self, mesh, *, split: str, pp_fn: Callable, batch_size: int,
                   filter_fn=None) -> Callable[[], Iterator[dict]]:
    """A factory of one-pass iterators of global eval batches."""
    def batches():
      ds = pipeline.eval_dataset(
          self.source, split=split, pp_fn=pp_fn,
          local_batch_size=batch_size // jax.process_count(),
          filter_fn=filter_fn, process_index=jax.process_index(),
          process_count=jax.process_count())
      return pipeline.iterate_global(ds, sharding.batch_sharding(mesh),
                                     what=f"{self.source.name}[{split}]")
    return batches
