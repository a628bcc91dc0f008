"""Tasks bind a model to a loss, a data stream and evaluators.

`get(name)` maps `config.task` to its class; the table is explicit (no
registration by import side effect) so a reader sees every task here.
"""
from __future__ import annotations

import importlib

from multimodal.config import config_lib

# config.task -> "module:Class", imported on demand so a task's heavy
# dependencies load only when it runs.
_TASKS = {
    "classify": "multimodal.tasks.classify:ClassificationTask",
    "clip": "multimodal.tasks.clip:ContrastiveTask",
    "dit": "multimodal.tasks.dit:DiffusionTask",
    "vlm": "multimodal.tasks.vlm:VisionLanguageTask",
}

def get(name: str):
  if name not in _TASKS:
    raise config_lib.ConfigError(
        f"unknown config.task '{name}'; known tasks: {', '.join(sorted(_TASKS))}.")
  module, cls = _TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)
