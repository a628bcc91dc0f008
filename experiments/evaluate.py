"""`./launch.sh eval --workdir DIR`: re-runs the evaluators of a finished or
running experiment on its latest checkpoint, with its saved config.
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate.")


def main(argv: list[str]) -> None:
  flags.FLAGS(argv)
  workdir = WORKDIR.value
  config_path = os.path.join(workdir or "", "config.json")
  if not workdir or not os.path.exists(config_path):
    print(f"error: no config.json in --workdir={workdir!r}; point --workdir at "
          "a directory written by `./launch.sh run`.", file=sys.stderr)
    sys.exit(2)
  from multimodal import report, tasks, trainer
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = tasks.get(config.task)(config)
  summary = trainer.evaluate(task, config, workdir)
  print(f"Results at step {summary['step']}, saved to {workdir}/eval_results.json:")
  print(report.results_table(summary["metrics"]))


if __name__ == "__main__":
  main(sys.argv)
