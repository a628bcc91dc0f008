"""Running an encoder over a finite stream of global batches."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
  """Gathers a (possibly multi-host) global array into a numpy array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def collect(batches: Iterable[dict], outputs: Callable[[dict], dict]) -> dict:
  """Concatenates `outputs(batch)` over all batches, dropping padding rows.

  `outputs` maps a global batch to a dict of arrays whose leading axis is the
  batch; rows where the batch's `_mask` is False were padding and are dropped.
  """
  chunks: dict[str, list] = {}
  for batch in batches:
    mask = to_host(batch["_mask"]).astype(bool)
    for key, value in outputs(batch).items():
      chunks.setdefault(key, []).append(to_host(value)[mask])
  if not chunks:
    raise ValueError("the evaluation split yielded no examples.")
  return {key: np.concatenate(parts) for key, parts in chunks.items()}


def normalise(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)
