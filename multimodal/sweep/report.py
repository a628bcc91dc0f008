"""A sweep's results: the ranked markdown table, sweep.csv and a plot per
swept key (`./launch.sh sweep --collect`)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re

from multimodal.config import config_lib
from multimodal.sweep.points import (Point, SweepError, format_value, sanitise, short_keys,
                                     status, swept_keys, write_atomic)

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
  write_atomic(csv_path, _csv_text(rows, keys, metric_names))
  markdown = markdown_table(ranked, keys, metric_names, metric, mode, winner)
  md_path = os.path.join(sweep_dir, "sweep.md")
  write_atomic(md_path, markdown)
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
      path = os.path.join(plot_dir, f"{sanitise(metric.replace('/', '.'))}"
                                    f"--{sanitise(key)}.png")
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
