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


class MetricsWriter:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._tensorboard = metric_writers.SummaryWriter(
          os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
