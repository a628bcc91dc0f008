"""Helpers for experiment configs: big_vision-style arg strings, validation
when the config is parsed, and durations given in steps, epochs or examples.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re

import ml_collections

from multimodal.data import preprocess


class ConfigError(ValueError):
  """A config key or value is wrong; the message says which and how to fix it."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:variant=S/8,steps=3000` style args over `defaults`.

  Values are read as Python literals when they parse as one (3000, 1e-3,
  True), and as strings otherwise (S/8). Keys must be among the defaults.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"unknown config argument '{key}' in '{arg}'."
          f"{did_you_mean(key, defaults)} Valid arguments: {sorted(defaults)}.")
    if not sep:  # A bare flag, e.g. `:fast`, means True.
      value = "True"
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    default = defaults[key]
    if isinstance(default, float) and isinstance(parsed, int):
      parsed = float(parsed)
    if default is not None and not isinstance(parsed, type(default)):
      raise ConfigError(
          f"config argument {key}={value!r} should be a "
          f"{type(default).__name__}, like its default {default!r}.")
    result[key] = parsed
  return result


def did_you_mean(key: str, candidates) -> str:
  close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
  return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def flat_keys(config, prefix="") -> list[str]:
  keys = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, path + "."))
  return keys


def unknown_key_message(key: str, config) -> str:
  """Names an unknown (dotted) key and the closest valid ones."""
  valid = flat_keys(config)
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  parent = key.rsplit(".", 1)[0] if "." in key else ""
  siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent and "." in k
              ] if parent else [k for k in valid if "." not in k]
  hint = (f" Did you mean {' or '.join(repr(c) for c in close)}?"
          if close else "")
  return (f"unknown config key '{key}'.{hint} "
          f"Keys at that level: {', '.join(sorted(siblings)) or '(none)'}.")


def validate(config) -> None:
  """Checks what can be checked before anything compiles.

  Every preprocessing string (a key named `pp` anywhere in the config) is
  parsed now, so an unknown op or a bad argument fails in a second, not after
  minutes of compilation the way it does in big_vision.
  """
  for path, value in _walk(config):
    if path.rsplit(".", 1)[-1] == "pp" and value is not None:
      try:
        preprocess.parse(value)
      except preprocess.PreprocessError as e:
        raise ConfigError(f"config.{path}: {e}") from None
  check_lr_mults(config.get("lr_mults"))
  durations = [k for k in ("total_steps", "total_epochs", "total_examples")
               if config.get(k) is not None]
  if len(durations) != 1:
    raise ConfigError(
        "give the training length as exactly one of total_steps, total_epochs "
        f"or total_examples; got {durations or 'none'}. E.g. "
        "--config.total_steps=1000 (set the others to None).")


def check_lr_mults(lr_mults) -> None:
  """`config.lr_mults`: (regex over param paths, multiplier >= 0) pairs."""
  for rule in lr_mults or ():
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2
            and isinstance(rule[0], str) and isinstance(rule[1], (int, float))
            and rule[1] >= 0):
      raise ConfigError(
          "config.lr_mults entries are (regex, multiplier >= 0) pairs, e.g. "
          f"(('llm/.*', 0.1),); got {rule!r}.")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"config.lr_mults pattern {rule[0]!r} is not a regex: {e}.") from None


def _walk(config, prefix=""):
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, path + ".")
    else:
      yield path, value


def total_steps(config, num_train_examples: int | None) -> int:
  """Resolves the training length to steps of `config.input.batch_size`."""
  batch = config.input.batch_size
  if config.get("total_steps") is not None:
    return int(config.total_steps)
  if config.get("total_examples") is not None:
    return max(1, int(config.total_examples) // batch)
  if num_train_examples is None:
    raise ConfigError(
        "total_epochs needs the size of the training split, which this source "
        "does not know; give --config.total_steps instead.")
  return max(1, int(config.total_epochs * num_train_examples) // batch)


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# The repository root: config paths like "configs/x.py" resolve against it
# when they are not found relative to the working directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  return os.path.join(REPO_ROOT, path)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Builds `path/to/config.py[:ARGS]` by calling its get_config(ARGS)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "_config_file", resolve_config_path(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved as `workdir/config.json`."""
  path = os.path.join(workdir or "", "config.json")
  if not workdir or not os.path.exists(path):
    raise ConfigError(f"no config.json in workdir {workdir!r}; point it at a "
                      "directory written by `./launch.sh run`.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
