"""Reading diffusers / transformers model directories into numpy, and
checking converted trees.

Pretrained weights arrive as local files (no network, and no torch at run
time): a model directory holds ``config.json`` and the weights as
``diffusion_pytorch_model.safetensors`` (or ``model.safetensors``, or shards
listed in a ``*.safetensors.index.json``). Everything that can go wrong with
such a directory raises ``WeightImportError`` naming the file and what to do,
because the usual mistakes (pointing at the pipeline root instead of its
``vae/`` folder, a half-finished download, pickled ``.bin`` weights) are
otherwise reported as opaque deserialisation errors.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
import safetensors
import safetensors.numpy

CONFIG_NAME = "config.json"
# In the order they are looked for.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"


class WeightImportError(ValueError):
  """Pretrained weights cannot be imported; the message says which file and why."""


def require_field(cfg: dict, field: str, ok, want: str, default=None, *,
                  source: str, target: str):
  """cfg[field] (or `default` when missing) if `ok` accepts it; otherwise a
  WeightImportError naming the field, its value and what `target` needs."""
  value = cfg.get(field, default)
  if not ok(value):
    raise WeightImportError(
        f"{source} config field {field}={value!r} is not supported: {target} needs "
        f"{field} {want}.")
  return value


# --------------------------------------------------------------------------
# safetensors files.


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (name -> array).

  Read with safetensors.numpy; bfloat16 tensors, which numpy itself cannot
  name, come back as ml_dtypes.bfloat16 arrays (``np.asarray(x, np.float32)``
  converts them exactly).
  """
  if not os.path.isfile(path):
    raise WeightImportError(f"weights file {path} does not exist.")
  try:
    return safetensors.numpy.load_file(path)
  except TypeError as e:
    if "bfloat16" not in str(e):
      raise
    return _read_with_bfloat16(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise WeightImportError(
        f"{path} is not a readable safetensors file ({e}). It is probably "
        "truncated or corrupt (e.g. an interrupted download): download or "
        "re-save it (diffusers: model.save_pretrained(dir)).") from None


# safetensors dtype tags -> numpy dtypes, for the bfloat16 fallback.
def _dtypes() -> dict[str, Any]:
  import ml_dtypes  # A jax dependency.
  return {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
          "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_with_bfloat16(path: str) -> dict[str, np.ndarray]:
  """The safetensors layout read by hand: u64 header size, JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
  dtypes = _dtypes()
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
      data = f.read()
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      begin, end = info["data_offsets"]
      if end > len(data):
        raise ValueError(f"tensor {name} runs past the end of the file")
      dtype = np.dtype(dtypes[info["dtype"]])
      out[name] = np.frombuffer(data[begin:end], dtype).reshape(info["shape"]).copy()
    return out
  except (ValueError, KeyError, struct.error) as e:
    raise WeightImportError(
        f"{path} is not a readable safetensors file ({e}); download or re-save it.") from None


# --------------------------------------------------------------------------
# Model directories, as diffusers' and transformers' save_pretrained write them.


def read_config(directory: str) -> dict:
  """``directory/config.json`` as a dict, with errors that say what to do."""
  _check_directory(directory)
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    hint = _pipeline_hint(directory)
    raise WeightImportError(
        f"{path} does not exist: a model directory (save_pretrained's output) "
        f"holds config.json next to its weights.{hint}")
  return read_json_object(path)


def read_json_object(path: str) -> dict:
  """A JSON file holding an object (config.json and its siblings)."""
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WeightImportError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(cfg, dict):
    raise WeightImportError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
  return cfg


def weights_files(directory: str) -> list[str]:
  """The safetensors file(s) holding the model's weights, in load order."""
  _check_directory(directory)
  for name in WEIGHT_NAMES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return [path]
  for name in WEIGHT_NAMES:
    index = os.path.join(directory, name.replace(".safetensors", INDEX_SUFFIX))
    if os.path.isfile(index):
      return _shards(index)
  present = sorted(os.listdir(directory))
  if any(p.endswith(".bin") for p in present):
    hint = (" It has only PyTorch pickle (.bin) weights, which are not read here "
            "(no torch at run time): re-save them as safetensors with "
            "model.save_pretrained(dir, safe_serialization=True).")
  elif any(p.endswith(".safetensors") for p in present):
    hint = (" It has other .safetensors files (a variant such as fp16?); rename "
            f"the one to use to {WEIGHT_NAMES[0]}.")
  else:
    hint = _pipeline_hint(directory)
  raise WeightImportError(
      f"no weights in {directory}: expected {' or '.join(WEIGHT_NAMES)} (or a sharded "
      f"*{INDEX_SUFFIX}). Found: {present[:10] or 'nothing'}.{hint}")


def _shards(index_path: str) -> list[str]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise WeightImportError(f"{index_path} is not a valid shard index ({e}).") from None
  directory = os.path.dirname(index_path)
  return [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the model's weights file(s), name -> numpy array."""
  state = {}
  for path in weights_files(directory):
    state.update(read_safetensors(path))
  return state


def read_model_dir(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config dict, state dict) of a diffusers or transformers model directory."""
  return read_config(directory), read_state_dict(directory)


def _check_directory(directory: str) -> None:
  if not directory or not os.path.isdir(directory):
    raise WeightImportError(
        f"model directory {directory!r} does not exist; point at a local "
        "directory written by save_pretrained (holding config.json and "
        f"{WEIGHT_NAMES[0]}).")


def _pipeline_hint(directory: str) -> str:
  """A pipeline root has model_index.json and one subfolder per model."""
  if not os.path.isfile(os.path.join(directory, "model_index.json")):
    return ""
  subdirs = sorted(d for d in os.listdir(directory)
                   if os.path.isfile(os.path.join(directory, d, CONFIG_NAME)))
  return (f" {directory} is a diffusers PIPELINE directory: point at one of its model "
          f"subfolders instead: {subdirs}.")


# --------------------------------------------------------------------------
# Checking a converted tree against the model's own.


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> {"a/b/c": leaf}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{"a/b/c": leaf} -> nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def check_tree(params: Mapping, expected: Mapping, what: str = "weights",
               show: int = 5) -> None:
  """Raises WeightImportError unless ``params`` has exactly the paths and
  shapes of ``expected`` (e.g. jax.eval_shape of our init; nn.Partitioned
  boxes are looked through). The message lists the first ``show`` missing,
  unexpected and mis-shaped paths, which is what one needs to fix a mapping.
  """
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  want = {k: tuple(v.shape) for k, v in flatten(_unbox(expected)).items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if not (missing or unexpected or misshaped):
    return
  lines = [f"converted {what} do not match the model's parameter tree:"]
  for name, keys, fmt in (
      ("missing", missing, lambda k: f"{k} {want[k]}"),
      ("unexpected", unexpected, lambda k: f"{k} {got[k]}"),
      ("mis-shaped", misshaped, lambda k: f"{k}: got {got[k]}, model has {want[k]}")):
    if keys:
      more = f" (and {len(keys) - show} more)" if len(keys) > show else ""
      lines.append(f"  {len(keys)} {name}{more}: " + "; ".join(fmt(k) for k in keys[:show]))
  raise WeightImportError("\n".join(lines))


def _unbox(tree):
  """Plain nested dicts with nn.Partitioned boxes replaced by their values."""
  if isinstance(tree, Mapping):
    return {k: _unbox(v) for k, v in tree.items()}
  return tree.value if isinstance(tree, nn.Partitioned) else tree


# --------------------------------------------------------------------------
# Helpers shared by the converters.


class StateDict:
  """A torch state dict (name -> numpy) that records which keys were read, so
  a converter can report checkpoint entries it did not map (a sign of a config
  it does not understand) instead of silently dropping them."""

  def __init__(self, state: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self._state = dict(state)
    self._used: set[str] = set()
    self.source = source

  def get(self, key: str) -> np.ndarray:
    """The tensor as float32; a missing key is a WeightImportError."""
    if key not in self._state:
      near = sorted(k for k in self._state if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])
      raise WeightImportError(
          f"{self.source} has no tensor {key!r} (siblings: {near[:6] or 'none'}); "
          "is it a checkpoint of the model type the importer expects?")
    self._used.add(key)
    return np.asarray(self._state[key], np.float32)

  def check_all_used(self, ignore=(), show: int = 5) -> None:
    left = sorted(k for k in self._state if k not in self._used and k not in ignore)
    if left:
      more = f" (and {len(left) - show} more)" if len(left) > show else ""
      raise WeightImportError(
          f"{len(left)} tensors of the {self.source} were not mapped to any "
          f"parameter{more}: {left[:show]}. The checkpoint has parts this importer "
          "does not understand (a config option it does not support?).")


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> flax Dense kernel (in, out). A 1x1 conv
  weight (out, in, 1, 1), as in old checkpoints' attention, also works."""
  if w.ndim == 4 and w.shape[2:] == (1, 1):
    w = w[:, :, 0, 0]
  if w.ndim != 2:
    raise WeightImportError(f"expected a Linear weight (out, in), got shape {w.shape}")
  return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> flax Conv kernel (kh, kw, I, O)."""
  if w.ndim != 4:
    raise WeightImportError(f"expected a Conv2d weight (O, I, kh, kw), got shape {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
