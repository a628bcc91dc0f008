"""Hyperparameter sweeps: what `./launch.sh sweep CONFIG` runs and collects.

A config file may define `get_sweep(arg)`, returning either

  * a list of override dicts, one per point: [{"lr": 1e-3}, {"lr": 3e-3, "wd": 0.0}]
  * or a dict of value lists, meaning their Cartesian product:
    {"lr": [1e-3, 3e-3], "input.batch_size": [64, 128]}  (4 points).

Keys are dotted config keys; values are plain literals (bool, int, float, str
or tuples of them), passed to each point's training run as
`--config.KEY=VALUE` flags that ml_collections parses back to the same value.
This module is the logic (expand, validate, name, collect, table, plots, the
SLURM script, device sets); experiments/sweep.py is the command line.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex

import ml_collections

from multimodal import config_lib


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
    try:
      config_lib.validate(config)
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


def _sanitise(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def point_names(points: list[dict]) -> list[str]:
  """Readable, stable, unique directory names: `lr=0.001,batch_size=64`."""
  short = short_keys(k for p in points for k in p)
  names = []
  for point in points:
    name = ",".join(f"{short[k]}={format_value(v)}" for k, v in point.items())
    name = _sanitise(name) or "base"
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
  _write_atomic(path, json.dumps({
      "config": spec, "sweep_args": sweep_arg, "overrides": list(base_overrides),
      "points": [{"index": p.index, "name": p.name, "overrides": p.overrides,
                  "workdir": p.workdir, "args": p.args()} for p in points],
  }, indent=2))


# -- Devices ---------------------------------------------------------------------


def detect_accelerators() -> tuple[str, list[str]]:
  """("gpu", ids) / ("tpu", chip ids) / ("cpu", []) without starting JAX
  (which would claim every device in this process)."""
  import glob
  import shutil
  import subprocess
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and visible.strip() not in ("", "-1"):
    return "gpu", [d.strip() for d in visible.split(",") if d.strip()]
  if visible is None and shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                           timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
      out = ""
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    if gpus:
      return "gpu", [str(i) for i in range(len(gpus))]
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  if chips:
    return "tpu", [str(i) for i in range(len(chips))]
  return "cpu", []


# Chips per process -> TPU_CHIPS_PER_PROCESS_BOUNDS (a single-host slice).
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}


def device_envs(platform: str, devices: list[str], parallel: int) -> list[dict]:
  """Environment additions for `parallel` concurrent points on disjoint devices.

  GPU: CUDA_VISIBLE_DEVICES. TPU: TPU_VISIBLE_CHIPS with its process bounds
  and a port per process (1, 2 or 4 chips per point). CPU: nothing; the
  processes share the cores. One point at a time sees every device.
  """
  if parallel < 1:
    raise SweepError(f"--parallel must be at least 1; got {parallel}.")
  if parallel == 1 or platform == "cpu":
    return [{} for _ in range(parallel)]
  if len(devices) < parallel:
    raise SweepError(f"--parallel {parallel} needs at least {parallel} "
                     f"{platform.upper()}s; this host has {len(devices)}.")
  per = len(devices) // parallel
  groups = [devices[i * per:(i + 1) * per] for i in range(parallel)]
  if platform == "gpu":
    return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]
  if platform == "tpu":
    if per not in _TPU_BOUNDS:
      raise SweepError(f"--parallel {parallel} gives each point {per} TPU chips; "
                       f"use a --parallel that gives {sorted(_TPU_BOUNDS)}.")
    envs = []
    for i, group in enumerate(groups):
      port = str(8476 + i)
      envs.append({"TPU_VISIBLE_CHIPS": ",".join(group),
                   "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[per],
                   "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": port,
                   "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
                   "TPU_MESH_CONTROLLER_PORT": port})
    return envs
  raise SweepError(f"unknown platform {platform!r}.")


# -- SLURM -----------------------------------------------------------------------


def array_spec(indices: list[int]) -> str:
  """[0, 1, 2, 5] -> "0-2,5" (sbatch --array syntax)."""
  indices = sorted(indices)
  parts = []
  for _, run in itertools.groupby(enumerate(indices), lambda t: t[1] - t[0]):
    run = [i for _, i in run]
    parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
  return ",".join(parts)


def slurm_script(*, job_name: str, indices: list[int], sweep_dir: str, cwd: str,
                 command: list[str], sbatch: list[str] = (), parallel: int = 1) -> str:
  """An sbatch array script: task $SLURM_ARRAY_TASK_ID runs that point."""
  array = array_spec(indices) + (f"%{parallel}" if parallel > 1 else "")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --array={array}",
           f"#SBATCH --output={os.path.join(sweep_dir, 'slurm-%A_%a.log')}"]
  lines += [f"#SBATCH --{opt.lstrip('-')}" for opt in sbatch]
  lines += ["# One array task per sweep point (written by ./launch.sh sweep --slurm).",
            "set -euo pipefail",
            f"cd {shlex.quote(cwd)}",
            " ".join(shlex.quote(a) for a in command)
            + ' --point="$SLURM_ARRAY_TASK_ID"']
  return "\n".join(lines) + "\n"


# -- Collection ------------------------------------------------------------------

_LOWER_IS_BETTER = re.compile(r"loss|error|(^|[/_])err|fid|perplexity|nll|mse|mae",
                              re.IGNORECASE)


def default_metric(metric_names: list[str]) -> str | None:
  """The first top-1 accuracy (`.../acc1`, `...accuracy`), else the first metric."""
  for name in metric_names:
    if re.search(r"(^|/)acc1$|accuracy$", name):
      return name
  return metric_names[0] if metric_names else None


def resolve_mode(metric: str, mode: str) -> str:
  if mode in ("max", "min"):
    return mode
  if mode != "auto":
    raise SweepError(f"--mode is max, min or auto; got {mode!r}.")
  return "min" if _LOWER_IS_BETTER.search(metric or "") else "max"


def collect(points: list[Point], sweep_dir: str, metric: str | None = None,
            mode: str = "auto") -> dict:
  """Writes sweep.csv, sweep.md and plots/*.png under `sweep_dir`; returns
  {"rows", "metric", "mode", "winner", "markdown", "csv", "md", "plots"}."""
  keys = swept_keys(points)
  rows, metric_names = [], []
  for point in points:
    row = {"point": point.name, "hparams": point.overrides, "status": status(point),
           "step": None, "wall_time_seconds": None, "metrics": {}}
    if row["status"] == "done":
      with open(os.path.join(point.workdir, "results.json")) as f:
        results = json.load(f)
      row["step"] = results.get("step")
      row["wall_time_seconds"] = results.get("wall_time_seconds")
      row["metrics"] = {k: v for k, v in results.get("metrics", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
      metric_names += [k for k in row["metrics"] if k not in metric_names]
    rows.append(row)
  if metric and metric_names and metric not in metric_names:
    raise SweepError(f"--metric {metric!r} is not among the results' metrics: "
                     f"{', '.join(metric_names)}.{config_lib.did_you_mean(metric, metric_names)}")
  metric = metric or default_metric(metric_names)
  mode = resolve_mode(metric, mode)
  ranked = _rank(rows, metric, mode)
  winner = ranked[0] if ranked and metric in ranked[0]["metrics"] else None

  os.makedirs(sweep_dir, exist_ok=True)
  csv_path = os.path.join(sweep_dir, "sweep.csv")
  _write_atomic(csv_path, _csv_text(rows, keys, metric_names))
  markdown = markdown_table(ranked, keys, metric_names, metric, mode, winner)
  md_path = os.path.join(sweep_dir, "sweep.md")
  _write_atomic(md_path, markdown)
  plots = plot_all(rows, keys, metric_names, os.path.join(sweep_dir, "plots"),
                   winner, mode)
  return {"rows": rows, "metric": metric, "mode": mode,
          "winner": winner["point"] if winner else None, "markdown": markdown,
          "csv": csv_path, "md": md_path, "plots": plots}


def _rank(rows, metric, mode):
  def sort_key(row):
    value = row["metrics"].get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return (1, 0.0)
    return (0, -value if mode == "max" else value)
  return sorted(rows, key=sort_key)  # Stable: ties keep the sweep's order.


def _csv_text(rows, keys, metric_names) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["point", *keys, "status", "step", "wall_time_seconds", *metric_names])
  for row in rows:
    hp = [format_value(row["hparams"][k]) if k in row["hparams"] else "" for k in keys]
    metrics = [repr(row["metrics"][m]) if m in row["metrics"] else ""
               for m in metric_names]
    writer.writerow([row["point"], *hp, row["status"], _blank(row["step"]),
                     _blank(row["wall_time_seconds"]), *metrics])
  return out.getvalue()


def _blank(value) -> str:
  return "" if value is None else str(value)


def markdown_table(ranked, keys, metric_names, metric, mode, winner) -> str:
  """The points best first by `metric`; the winner in bold."""
  order = ([metric] if metric else []) + [m for m in metric_names if m != metric]
  better = "higher" if mode == "max" else "lower"
  head = (f"Sorted by `{metric}` ({better} is better). Winner: **{winner['point']}**."
          if winner else "No point has finished yet.")
  columns = ["point", *keys, "status", *order]
  lines = [head, "", "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  for row in ranked:
    name = f"**{row['point']}**" if row is winner else row["point"]
    cells = [name]
    cells += [format_value(row["hparams"][k]) if k in row["hparams"] else ""
              for k in keys]
    cells.append(row["status"])
    cells += [f"{row['metrics'][m]:.4g}" if m in row["metrics"] else "" for m in order]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return "\n".join(lines) + "\n"


def plot_all(rows, keys, metric_names, plot_dir, winner, mode) -> list[str]:
  """One PNG per (metric, swept hyperparameter that takes several values)."""
  done = [r for r in rows if r["status"] == "done"]
  varying = [k for k in keys
             if len({r["hparams"].get(k) for r in rows if k in r["hparams"]}) > 1]
  if not done or not varying:
    return []
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  os.makedirs(plot_dir, exist_ok=True)
  short = short_keys(keys)
  paths = []
  for metric in metric_names:
    for key in varying:
      points = [r for r in done if key in r["hparams"] and metric in r["metrics"]]
      if not points:
        continue
      path = os.path.join(plot_dir, f"{_sanitise(metric.replace('/', '.'))}"
                                    f"--{_sanitise(key)}.png")
      fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
      _plot_one(ax, points, key, metric, [k for k in varying if k != key], short)
      if winner in points:
        x = _x_positions(points, key)[points.index(winner)]
        ax.plot([x], [winner["metrics"][metric]], marker="*", markersize=14,
                color="gold", markeredgecolor="black", linestyle="none",
                label=f"winner ({winner['point']})", zorder=5)
      ax.set_xlabel(key)
      ax.set_ylabel(metric)
      ax.set_title(f"{metric} vs {short[key]}", fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      fig.tight_layout()
      tmp = path + ".tmp.png"
      fig.savefig(tmp)
      plt.close(fig)
      os.replace(tmp, path)
      paths.append(path)
  return paths


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def use_log_x(values) -> bool:
  """Log-x for positive numbers spanning 10x or more (1e-3 .. 1e-2 included)."""
  return (_numeric(values) and all(v > 0 for v in values)
          and max(values) / min(values) >= 10)


def _x_positions(points, key) -> list[float]:
  values = [p["hparams"][key] for p in points]
  if _numeric(values):
    return [float(v) for v in values]
  categories = list(dict.fromkeys(format_value(v) for v in values))
  return [float(categories.index(format_value(v))) for v in values]


def _plot_one(ax, points, key, metric, others, short) -> None:
  """The metric against `key`, one line per setting of the other swept keys."""
  values = [p["hparams"][key] for p in points]
  xs = _x_positions(points, key)
  if _numeric(values):
    if use_log_x(values):
      ax.set_xscale("log")
  else:
    categories = list(dict.fromkeys(format_value(v) for v in values))
    ax.set_xticks(range(len(categories)), categories, rotation=30, fontsize=8)
  groups: dict[str, list[int]] = {}
  for i, p in enumerate(points):
    label = ",".join(f"{short[k]}={format_value(p['hparams'][k])}"
                     for k in others if k in p["hparams"])
    groups.setdefault(label, []).append(i)
  for label, members in groups.items():
    members.sort(key=lambda i: xs[i])
    ax.plot([xs[i] for i in members], [points[i]["metrics"][metric] for i in members],
            marker="o", label=label or None)


def _write_atomic(path: str, text: str) -> None:
  """Concurrent writers (SLURM tasks collecting) never leave a torn file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
