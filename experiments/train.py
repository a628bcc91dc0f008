"""`./launch.sh run [CONFIG[:ARGS]] [--workdir DIR] [--config.KEY=VALUE ...]`.

Trains config.task with the generic trainer, then prints the results table.
"""
from __future__ import annotations

import sys

from experiments import cli


def main(argv: list[str]) -> None:
  cli.parse_flags(argv)
  # Heavy imports after the flags: a typo in a key fails in a second.
  from multimodal import tasks, trainer, report
  config = cli.CONFIG.value
  workdir = cli.WORKDIR.value or cli.default_workdir()
  print(f"Workdir: {workdir}")
  task = tasks.get(config.task)(config)
  summary = trainer.train(task, config, workdir)
  print(f"\nResults after {summary['step']} steps "
        f"({summary['wall_time_seconds']:.0f} s), saved to {workdir}/results.json:")
  print(report.results_table(summary["metrics"]))


if __name__ == "__main__":
  main(sys.argv)
