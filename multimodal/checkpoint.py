"""Checkpoints through orbax's CheckpointManager: the train state (params,
optimizer state, step) and a small JSON record of where the data stream is.
Saving is asynchronous, keeps the newest N, and restores with the shardings of
the current mesh, so a run can resume on a different device layout.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read."""


def manager(workdir: str, *, save_interval_steps: int = 1, keep: int = 2,
            read_only: bool = False) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  processes = None
  if jax.process_count() > 1:
    # Every process saves its shards jointly. Orbax's barriers then go through
    # the distributed runtime, not device collectives: it runs some from its
    # background thread, where a collective could pair up with a train
    # step's on another process. (Orbax cannot create the directory then.)
    processes = set(range(jax.process_count()))
    if not read_only:
      os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=keep,
      create=processes is None, enable_async_checkpointing=True,
      read_only=read_only, multiprocessing_options=ocp.options.MultiprocessingOptions(
          active_processes=processes))
  return ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_position: dict,
         *, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores (state, data_position) of `step` (default: the latest).

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: orbax
  places every restored array straight onto its shard.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {mngr.directory}.")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; all mean "unreadable".
    raise CheckpointError(
        f"checkpoint step {step} in {mngr.directory} could not be restored "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        "If it is corrupt, move that step's folder away to resume from the "
        "previous one; if the model config changed, restore with the config "
        "saved in the workdir.") from e
  return restored["state"], restored["data"]


def abstract_like(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
