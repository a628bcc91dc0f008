"""Benchmark results as files: one JSON per (dataset, model, task) in
CLIP_benchmark's schema, plus a combined CSV and a markdown table."""
from __future__ import annotations

import csv
import json
import os
import re

LANGUAGE = "en"
SCHEMA_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def record(dataset: str, model: str, pretrained: str, task: str,
           metrics: dict) -> dict:
  return {"dataset": dataset, "model": model, "pretrained": pretrained,
          "task": task, "metrics": {k: float(v) for k, v in metrics.items()},
          "language": LANGUAGE}


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.@-]+", "_", text).strip("_")[-80:]


def json_name(rec: dict) -> str:
  """CLIP_benchmark's file name: dataset_pretrained_model_language_task.json
  (the pretrained part is the weights' last path component)."""
  pretrained = os.path.basename(rec["pretrained"].rstrip("/"))
  return "_".join(slug(p) for p in (rec["dataset"], pretrained, rec["model"],
                                     rec["language"], rec["task"])) + ".json"


def metric_columns(records: list[dict]) -> list[str]:
  columns = []
  for rec in records:
    columns += [k for k in rec["metrics"] if k not in columns]
  return columns


def _cell(value: float) -> str:
  # Small non-zero values (a chosen weight decay) would print as 0.0000.
  return f"{value:.0e}" if value and abs(value) < 1e-3 else f"{value:.4f}"


def markdown(records: list[dict]) -> str:
  """One table per task, one row per (dataset, model), metrics as columns."""
  sections = []
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    columns = metric_columns(rows)
    lines = [f"**{task}**", "",
             "| dataset | model | " + " | ".join(columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for r in rows:
      cells = [_cell(r["metrics"][c]) if c in r["metrics"] else "" for c in columns]
      lines.append(f"| {r['dataset']} | {r['model']} | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
  return "\n\n".join(sections) + "\n"


def write(records: list[dict], out_dir: str) -> dict[str, str]:
  """Writes every record's JSON, results.csv and results.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  for rec in records:
    with open(os.path.join(out_dir, json_name(rec)), "w") as f:
      json.dump(rec, f, indent=2)
  columns = metric_columns(records)
  csv_path = os.path.join(out_dir, "results.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "model", "pretrained", "task", "language", *columns])
    for r in records:
      writer.writerow([r["dataset"], r["model"], r["pretrained"], r["task"],
                       r["language"], *(r["metrics"].get(c, "") for c in columns)])
  md_path = os.path.join(out_dir, "results.md")
  with open(md_path, "w") as f:
    f.write(markdown(records))
  return {"csv": csv_path, "markdown": md_path}
