"""Hyperparameter sweeps: what `./launch.sh sweep CONFIG` runs and collects.

A config file may define `get_sweep(arg)`, returning either

  * a list of override dicts, one per point: [{"lr": 1e-3}, {"lr": 3e-3, "wd": 0.0}]
  * or a dict of value lists, meaning their Cartesian product:
    {"lr": [1e-3, 3e-3], "input.batch_size": [64, 128]}  (4 points).

Keys are dotted config keys; values are plain literals (bool, int, float, str
or tuples of them), passed to each point's training run as
`--config.KEY=VALUE` flags that ml_collections parses back to the same value.
This module is the points (expand, validate, name, their state);
sweep_devices.py where they run (device sets, the SLURM script);
sweep_report.py their results (table, CSV, plots); experiments/sweep.py is
the command line.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re

import ml_collections

from multimodal.config import config_lib


class SweepError(ValueError):
  """A sweep definition is wrong; the message names the key or point."""


# -- Definition ----------------------------------------------------------------


def load_sweep(spec: str, arg: str | None = None):
  """Calls `get_sweep(arg)` of the config file `path[:ARGS]` names."""
  path = spec.partition(":")[0]
  config_lib.check_arg_string(arg)  # Parsed by get_sweep, never evaluated.
  module_spec = importlib.util.spec_from_file_location(
      "_sweep_config_file", config_lib.resolve_config_path(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(
        f"{path} defines no get_sweep(arg); add one returning a list of override "
        "dicts ([{'lr': 1e-3}, {'lr': 3e-3}]) or a dict of value lists "
        "({'lr': [1e-3, 3e-3]}).")
  return module.get_sweep(arg) if arg else module.get_sweep()


def expand(sweep) -> list[dict]:
  """The points of a sweep: list form as is, dict form as the product."""
  if isinstance(sweep, dict):
    for key, values in sweep.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(
            f"sweep key '{key}': the product form wants a non-empty list of "
            f"values, e.g. {{'{key}': [1e-3, 3e-3]}}; got {values!r}.")
    keys = list(sweep)
    points = [dict(zip(keys, combo))
              for combo in itertools.product(*(sweep[k] for k in keys))]
  elif isinstance(sweep, (list, tuple)):
    points = list(sweep)
    for i, point in enumerate(points):
      if not isinstance(point, dict):
        raise SweepError(f"sweep point {i} is {point!r}; each point of the list "
                         "form is a dict of overrides, e.g. {'lr': 1e-3}.")
  else:
    raise SweepError(f"get_sweep() returned a {type(sweep).__name__}; return a "
                     "list of override dicts or a dict of value lists.")
  if not points:
    raise SweepError("the sweep has no points.")
  result = []
  for point in points:
    clean = {}
    for key, value in point.items():
      if not isinstance(key, str) or not key:
        raise SweepError(f"sweep key {key!r} is not a dotted config key.")
      key = key.removeprefix("config.")
      clean[key] = _literal(key, value)
    result.append(clean)
  seen = {}
  for i, point in enumerate(result):
    frozen = tuple(sorted(point.items(), key=lambda kv: kv[0]))
    if frozen in seen:
      raise SweepError(f"sweep points {seen[frozen]} and {i} are the same: {point}.")
    seen[frozen] = i
  return result


def _literal(key: str, value):
  """`value` as a plain literal (lists become tuples), or a SweepError."""
  if isinstance(value, bool) or value is None:
    if value is None:
      raise SweepError(
          f"sweep key '{key}': None cannot be passed on the command line; sweep "
          "a real value (or leave the key out of that point).")
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return float(value)
  if isinstance(value, str):
    if "\n" in value:
      raise SweepError(f"sweep key '{key}': value {value!r} spans lines.")
    try:  # Passed on as --config.KEY=VALUE: never evaluated, and no code.
      config_lib.check_override_value(key, value)
    except config_lib.ConfigError as e:
      raise SweepError(f"sweep: {e}") from None
    return value
  if isinstance(value, (list, tuple)):
    return tuple(_literal(key, v) for v in value)
  raise SweepError(
      f"sweep key '{key}': value {value!r} ({type(value).__name__}) is not a plain "
      "literal; use a bool, int, float, str or a tuple of them.")


def check_keys(points: list[dict], config, base_overrides=()) -> None:
  """Every swept key exists in `config` and is not also overridden by hand."""
  given = {a.split("=", 1)[0][len("--config."):] for a in base_overrides
           if a.startswith("--config.")}
  for point in points:
    for key in point:
      try:
        node = config_lib.get_dotted(config, key)
      except config_lib.ConfigError as e:
        raise SweepError(f"sweep: {e}") from None
      if isinstance(node, ml_collections.ConfigDict):
        raise SweepError(f"sweep key '{key}' is a whole sub-config; sweep its "
                         f"leaves instead (e.g. '{key}.{next(iter(node), 'x')}').")
      if key in given:
        raise SweepError(f"sweep key '{key}' is also given as --config.{key}; "
                         "drop one of the two.")


# -- Overrides -----------------------------------------------------------------


def format_value(value) -> str:
  """The command-line text ml_collections parses back to exactly `value`."""
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, (int, float)):
    return repr(value)  # Shortest text that round-trips a float.
  if isinstance(value, str):
    return value  # A str field takes the raw text.
  if isinstance(value, tuple):
    return repr(value)
  raise SweepError(f"cannot format {value!r} as a flag value.")


def override_args(point: dict) -> list[str]:
  return [f"--config.{key}={format_value(value)}" for key, value in point.items()]


def parse_overrides(spec: str, args: list[str]) -> ml_collections.ConfigDict:
  """The config `python -m experiments.train SPEC *args` would build: the same
  ml_collections flag parser (locked config), on fresh flag values."""
  import warnings
  from absl import flags
  from ml_collections import config_flags
  argv = ["sweep", f"--config={spec}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections' own load_module() call.
    warnings.simplefilter("ignore", DeprecationWarning)
    values(argv)
  return values.config


def check_points(spec: str, points: list[dict], base_overrides=()) -> None:
  """Builds every point's config through the flag parser: each override must
  parse back to exactly its value, and the result must pass validation."""
  for i, point in enumerate(points):
    try:
      config = parse_overrides(spec, [*base_overrides, *override_args(point)])
    except Exception as e:  # noqa: BLE001 -- the flag parser raises many types.
      raise SweepError(f"sweep point {i} {point}: {_first_line(e)}") from None
    for key, want in point.items():
      got = config_lib.get_dotted(config, key)
      if isinstance(got, list):
        got = tuple(got)
      if got != want or type(got) is not type(want) and not (
          isinstance(want, int) and isinstance(got, float)):
        raise SweepError(
            f"sweep key '{key}': {want!r} ({type(want).__name__}) does not fit the "
            f"config field, which parses it as {got!r} ({type(got).__name__}).")
    from multimodal.tasks import config_checks  # Imports the pp ops.
    try:
      config_checks.check(config)
    except config_lib.ConfigError as e:
      raise SweepError(f"sweep point {i} {point}: {e}") from None


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# -- Points ----------------------------------------------------------------------


@dataclasses.dataclass
class Point:
  index: int
  name: str
  overrides: dict
  workdir: str

  def args(self) -> list[str]:
    return override_args(self.overrides)


def short_keys(keys) -> dict[str, str]:
  """Dotted key -> the shortest unambiguous suffix (`input.batch_size` ->
  `batch_size`, unless another swept key ends the same way)."""
  keys = list(dict.fromkeys(keys))
  result = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if sum(1 for k in keys if k == suffix or k.endswith("." + suffix)) == 1:
        result[key] = suffix
        break
    else:
      result[key] = key
  return result


def sanitise(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def point_names(points: list[dict]) -> list[str]:
  """Readable, stable, unique directory names: `lr=0.001,batch_size=64`."""
  short = short_keys(k for p in points for k in p)
  names = []
  for point in points:
    name = ",".join(f"{short[k]}={format_value(v)}" for k, v in point.items())
    name = sanitise(name) or "base"
    if len(name) > 120:
      name = name[:100] + "-" + _digest(point)
    names.append(name)
  counts: dict[str, int] = {}
  for name in names:
    counts[name] = counts.get(name, 0) + 1
  return [f"{n}-{_digest(p)}" if counts[n] > 1 else n for n, p in zip(names, points)]


def _digest(point: dict) -> str:
  import hashlib
  return hashlib.sha1(repr(sorted(point.items())).encode()).hexdigest()[:8]


def make_points(points: list[dict], sweep_dir: str) -> list[Point]:
  return [Point(i, name, overrides, os.path.join(sweep_dir, name))
          for i, (name, overrides) in enumerate(zip(point_names(points), points))]


def swept_keys(points: list[Point]) -> list[str]:
  return list(dict.fromkeys(k for p in points for k in p.overrides))


def status(point: Point) -> str:
  """done (results.json), failed (its last run failed) or pending."""
  if os.path.exists(os.path.join(point.workdir, "results.json")):
    return "done"
  if os.path.exists(os.path.join(point.workdir, FAILED_MARKER)):
    return "failed"
  return "pending"


FAILED_MARKER = "FAILED"
LOG_NAME = "train.log"


def write_sweep_json(path: str, spec: str, sweep_arg, base_overrides, points) -> None:
  write_atomic(path, json.dumps({
      "config": spec, "sweep_args": sweep_arg, "overrides": list(base_overrides),
      "points": [{"index": p.index, "name": p.name, "overrides": p.overrides,
                  "workdir": p.workdir, "args": p.args()} for p in points],
  }, indent=2))


def write_atomic(path: str, text: str) -> None:
  """Concurrent writers (SLURM tasks collecting) never leave a torn file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
