"""Putting pretrained weights into a freshly initialised train state.

A task may say which parts of its params come from elsewhere (a CLIP text
tower from a run of this codebase, a DiT from diffusers safetensors) by
returning them, as a nested dict of host arrays, from `pretrained_params()`.
The trainer calls `merge` once, on a fresh start only (a resumed run has them
in its checkpoint): every given leaf must name an existing param of the same
shape, and lands on that param's sharding.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from multimodal.train import optim


class PretrainedMismatchError(ValueError):
  """Pretrained weights do not fit the model the config builds."""


def check_fits(params: Mapping, pretrained: Mapping, what: str) -> None:
  """Raises PretrainedMismatchError naming unknown and mis-shaped paths."""
  target = optim.param_paths(params)
  given = optim.param_paths(pretrained)
  unknown = sorted(set(given) - set(target))
  misshaped = sorted(f"{p}: {tuple(np.shape(given[p]))} vs the model's "
                     f"{tuple(np.shape(target[p]))}" for p in given
                     if p in target and np.shape(given[p]) != np.shape(target[p]))
  if unknown or misshaped:
    lines = []
    if unknown:
      lines.append(f"{len(unknown)} not in the model (e.g. {', '.join(unknown[:3])})")
    if misshaped:
      lines.append(f"{len(misshaped)} with another shape ({'; '.join(misshaped[:3])})")
    raise PretrainedMismatchError(
        f"the weights from {what} do not fit the model of this config: "
        f"{' and '.join(lines)}. Make the config's model match the weights "
        "(variant, patch size, widths, vocabulary).")


def merge(params, pretrained: Mapping, shardings, what: str):
  """`params` with every leaf that `pretrained` gives replaced, sharded as before."""
  check_fits(params, pretrained, what)

  def replace(tree, given, tree_shardings):
    out = dict(tree)
    for key, value in given.items():
      if isinstance(value, Mapping):
        out[key] = replace(tree[key], value, tree_shardings[key])
      else:
        out[key] = jax.device_put(np.asarray(value, tree[key].dtype), tree_shardings[key])
    return out
  return replace(params, pretrained, shardings)
