"""Scalars to TensorBoard (through clu) and to `metrics.jsonl`, one line a step.

Only process 0 writes; the others keep the same call sites and do nothing.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from clu import metric_writers


def _drop_records_after(path: str, step: int) -> None:
  """Keeps the records of steps <= `step`: a run resumed from step `step`
  logs the later steps again, and the crashed run's lines for them would
  otherwise stand next to the new ones."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if _step_of(line) is not None
          and _step_of(line) <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> int | None:
  """A record's step; None for a line cut short by a crash mid-write."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return None


class MetricsWriter:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._tensorboard = metric_writers.SummaryWriter(
          os.path.join(workdir, "tensorboard"))
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_records_after(path, resume_step)
      self._jsonl = open(path, "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled or not scalars:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._tensorboard.write_scalars(step, scalars)
    record = {"step": step, "time": round(time.time(), 3),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()
      self._jsonl.close()
