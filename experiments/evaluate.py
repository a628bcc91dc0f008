"""`./launch.sh eval --workdir DIR`: re-runs the evaluators of a finished or
running experiment on its latest checkpoint, with its saved config.
"""
from __future__ import annotations

import sys

from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate.")


def main(argv: list[str]) -> None:
  flags.FLAGS(argv)
  workdir = WORKDIR.value
  from multimodal import config_lib
  try:
    config = config_lib.load_workdir_config(workdir)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from multimodal import report, tasks, trainer
  task = tasks.get(config.task)(config)
  summary = trainer.evaluate(task, config, workdir)
  print(f"Results at step {summary['step']}, saved to {workdir}/eval_results.json:")
  print(report.results_table(summary["metrics"]))


if __name__ == "__main__":
  main(sys.argv)
