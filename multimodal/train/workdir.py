"""Checks that a run's workdir can take what the run will write, made before
anything compiles: a workdir that cannot be written, or a disk without room
for the checkpoints, would otherwise surface only at the first save, after
minutes of compilation and training that are then lost.
"""
from __future__ import annotations

import errno
import os
import shutil

import jax


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written, or its disk is too full."""


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:.2f} GiB"


def state_bytes(abstract_state) -> int:
  """Bytes of a (global) state given as a tree of ShapeDtypeStructs."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def check(workdir: str, *, checkpoint_bytes: int, checkpoints_kept: int) -> None:
  """Creates `workdir` and proves it writable, with room on its disk for the
  kept checkpoints plus the one being written (orbax writes a new one before
  it deletes the oldest)."""
  fix = "Pass --workdir=DIR on a writable disk with room for the checkpoints."
  try:
    os.makedirs(workdir, exist_ok=True)
    # A real write, not os.access: a read-only mount, a full disk or a quota
    # fails here, and os.access says yes to root whatever the mode bits say.
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    reason = ("its disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT)
              else e.strerror or str(e))
    raise WorkdirError(f"the workdir {workdir} cannot be written: {reason}. {fix}") from None
  needed = checkpoint_bytes * (checkpoints_kept + 1)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise WorkdirError(
        f"the disk of workdir {workdir} has {_gib(free)} free, but "
        f"{checkpoints_kept} kept checkpoints plus the one being written need "
        f"about {_gib(needed)} ({_gib(checkpoint_bytes)} each). Free space, "
        f"lower --config.keep_ckpts, or {fix[0].lower()}{fix[1:]}")
