"""Helpers for experiment configs: big_vision-style arg strings, validation
when the config is parsed, and durations given in steps, epochs or examples.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Mapping

import ml_collections



class ConfigError(ValueError):
  """A config key or value is wrong; the message says which and how to fix it."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:variant=S/8,steps=3000` style args over `defaults`.

  Values are read as Python literals when they parse as one (3000, 1e-3,
  True), and as strings otherwise (S/8). Keys must be among the defaults.
  Nothing is ever evaluated: a value that is Python code (a call, a lambda,
  ...) is a ConfigError, not a string that might be run somewhere later.
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
    _reject_code(f"config argument {key}={value!r}", value)
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      parsed = value
    default = defaults[key]
    if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
      parsed = float(parsed)
    if default is not None and not isinstance(parsed, type(default)):
      raise ConfigError(
          f"config argument {key}={value!r} should be {_a(type(default))}, "
          f"like its default {default!r}.")
    result[key] = parsed
  return result


def check_arg_string(arg: str | None) -> None:
  """Rejects Python code in any value of a `k=v,k=v` argument string (what a
  config file's get_config(arg) or get_sweep(arg) receives), whoever parses it."""
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    _reject_code(f"config argument {key.strip()}={value!r}", value)


# -- Python code in argument strings ---------------------------------------------
# Argument strings are parsed (ast.literal_eval, or kept as plain text), never
# evaluated. A value that parses as a Python expression doing something -- a
# call, a lambda, a comprehension, dunder access -- is refused all the same,
# so that such a string never reaches a config where someone might run it.

_CODE_NODES = {
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression", ast.NamedExpr: "an assignment",
    ast.Await: "an await", ast.Yield: "a yield", ast.YieldFrom: "a yield",
    ast.Starred: "unpacking",
}


def python_code_reason(text: str, *, allow_op_calls: bool = False) -> str | None:
  """What makes `text` Python code, or None for a literal or a plain string.

  `S/8`, `mu`, `/tmp/a.dir/x`, `1e-3/3e-3` and `3e-4` are not code. With
  `allow_op_calls`, calls of a plain name with literal arguments (the
  preprocessing grammar: `decode|resize(64)|keep("image")`) are allowed, but
  never a builtin (`exec("...")`), a method (`os.system(...)`), a call of a
  call's result or any dunder name.
  """
  if not isinstance(text, str):
    return None
  try:
    tree = ast.parse(text.strip().replace("\n", " "), mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None  # Not an expression: plain text.
  for node in ast.walk(tree):
    for kind, what in _CODE_NODES.items():
      if isinstance(node, kind):
        return what
    name = (node.id if isinstance(node, ast.Name)
            else node.attr if isinstance(node, ast.Attribute) else "")
    if name.startswith("__") and name.endswith("__"):
      return f"the dunder name {name}"
    if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Call, ast.Subscript)):
      return "attribute access on a computed value"
    if isinstance(node, ast.Call):
      func = ast.unparse(node.func)
      if not allow_op_calls:
        return f"a call of {func}"
      if not isinstance(node.func, ast.Name) or node.func.id in dir(builtins):
        return f"a call of {func}"
      for value in [*node.args, *(kw.value for kw in node.keywords)]:
        try:
          ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
          return f"a call of {func} on a non-literal argument"
  return None


def _reject_code(what: str, text: str, *, allow_op_calls: bool = False,
                 kind: str = "config arguments") -> None:
  reason = python_code_reason(text, allow_op_calls=allow_op_calls)
  if reason is not None:
    raise ConfigError(
        f"{what} is Python code ({reason}); {kind} are literals (3000, 1e-3, "
        "True, (1, 2)) or plain strings (S/8, /path/to/dir) and are never "
        "evaluated.")


def check_override_value(key: str, value) -> None:
  """A `--config.KEY=VALUE` override (or a swept value) that ended up a str:
  no Python code (preprocessing specs like `decode|resize(64)` are fine)."""
  if isinstance(value, str):
    _reject_code(f"--config.{key}={value!r}", value, allow_op_calls=True,
                 kind="--config values")


def _a(kind: type) -> str:
  name = {bool: "bool (True or False)", tuple: "tuple (a Python literal, e.g. (1, 2))",
          ml_collections.ConfigDict: "dict (a Python literal, e.g. {'a': 1})"
          }.get(kind, kind.__name__)
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


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


def is_node(node) -> bool:
  return isinstance(node, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict,
                           Mapping))


def get_dotted(config, key: str):
  """`config["a"]["b"]["c"]` for key "a.b.c"; a ConfigError naming the key and
  the closest valid ones if there is no such key."""
  node = config
  for part in key.split("."):
    if not is_node(node) or part not in node:
      raise ConfigError(unknown_key_message(key, config))
    node = node[part]
  return node


def has_dotted(config, key: str) -> bool:
  try:
    get_dotted(config, key)
  except ConfigError:
    return False
  return True


def set_dotted(config, key: str, value) -> None:
  """Sets the dotted `key` of `config` (its parent must exist; a locked
  config still refuses a new leaf)."""
  parent, _, leaf = key.rpartition(".")
  if parent and not has_dotted(config, parent):
    raise ConfigError(unknown_key_message(key, config))
  node = get_dotted(config, parent) if parent else config
  if not is_node(node):
    raise ConfigError(f"config.{parent} is a {type(node).__name__}, not a "
                      f"sub-config: cannot set config.{key}.")
  try:
    node[leaf] = value
  except (KeyError, AttributeError):  # A new leaf of a locked config.
    raise ConfigError(unknown_key_message(key, config)) from None


def explain_override_error(error: Exception, config, overrides: list[str]) -> str:
  """One line for a failure of the `--config.KEY=VALUE` flag parser: the
  first unknown key (with the closest valid ones), or the override whose
  value does not fit its field (its key, the value and the type it needs)."""
  pairs = []
  for arg in overrides:
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      pairs.append((key, value if sep else None))
  for key, _ in pairs:
    if not has_dotted(config, key):
      return unknown_key_message(key, config)
  text = str(error).strip()
  for key, value in pairs:
    prefix = f"flag --config.{key}="
    if text.startswith(prefix + (value or "")):
      if value is None:  # `--config.KEY VALUE`: the parser's message has it.
        value = text[len(prefix):].split(": ", 1)[0]
      parent, _, leaf = key.rpartition(".")
      node = get_dotted(config, parent) if parent else config
      try:
        kind = node.get_type(leaf)
      except (AttributeError, KeyError, TypeError):
        kind = type(node[leaf])
      current = node[leaf]
      if isinstance(current, ml_collections.ConfigDict):
        current = current.to_dict()
      example = (f"e.g. --config.{key}={current!r}, its current value"
                 if isinstance(current, (bool, int, float, tuple))
                 else f"it is now {current!r}")
      return (f"--config.{key}={value}: config.{key} takes {_a(kind)}, not "
              f"{value!r} ({example}).")
  return text.splitlines()[0] if text else type(error).__name__


def validate(config) -> None:
  """The checks that need nothing but the config itself: learning-rate
  multipliers and exactly one training length. What needs the pp ops or the
  models (pp strings, image sizes, runs to start from) is
  `multimodal.tasks.config_checks.check`, which calls this first."""
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


def walk(config, prefix=""):
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from walk(value, path + ".")
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


# The repository root: config paths like "configs/x.py" (or just "x.py", one
# of configs/) resolve against it when the caller has no such file.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Set by launch.sh to the directory it was called from before it cds into the
# repository: a relative path on the command line is the caller's.
CALLER_DIR_ENV = "MM_CALLER_DIR"


def resolve_config_path(path: str) -> str:
  """`path` from the caller's directory, else the working directory, else the
  repository, else the repository's configs/; as given if none has it."""
  if os.path.isabs(path):
    return path
  caller = os.environ.get(CALLER_DIR_ENV)
  for base in (caller, os.getcwd(), REPO_ROOT, os.path.join(REPO_ROOT, "configs")):
    if base and os.path.isfile(os.path.join(base, path)):
      return path if base == os.getcwd() else os.path.join(base, path)
  return path


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Builds `path/to/config.py[:ARGS]` by calling its get_config(ARGS)."""
  path, _, arg = spec.partition(":")
  check_arg_string(arg)  # Whatever get_config does with it: never code.
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
