"""`./launch.sh run [CONFIG[:ARGS]] [--workdir DIR] [--config.KEY=VALUE ...]`.

Trains config.task with the generic trainer, then prints the results table.
With --procs, --slurm or --tpu (experiments/launcher.py) it instead fans the
same command out to the processes of a multi-process job; each of those joins
the job through multimodal/distributed.py before anything else uses JAX.
"""
from __future__ import annotations

import sys

from experiments import cli
from experiments.common import fail, user_errors


def run_errors() -> tuple[type[Exception], ...]:
  """What a training run reports as one line (exit status 2): bad input, a
  workdir or checkpoint it cannot use, or a diverged loss."""
  from multimodal.train import checkpoint, trainer, workdir
  return (*user_errors(), checkpoint.CheckpointError, workdir.WorkdirError,
          trainer.TrainingDivergedError)


def main(argv: list[str]) -> None:
  from experiments import launcher
  from multimodal.parallel import distributed
  try:
    launch_options, argv = launcher.split_args(argv)
    launch = launcher.validate(launch_options) if launch_options else None
  except launcher.LaunchError as e:
    fail(str(e))
  cli.parse_flags(argv)
  if launch is not None:
    # Every process and node must agree on the workdir: fix it once, here.
    workdir = cli.WORKDIR.value or cli.default_workdir()
    try:
      sys.exit(launcher.launch(launch, argv, workdir))
    except launcher.LaunchError as e:
      fail(str(e))
  try:
    distributed.initialize()
  except distributed.DistributedError as e:
    fail(str(e))
  from multimodal.train import preemption
  with distributed.leave_at_once_on_error(keep_exit_codes=(preemption.PREEMPTED_EXIT_CODE,)):
    _train_and_report()


def _train_and_report() -> None:
  # Heavy imports after the flags: a typo in a key fails in a second.
  import jax
  from multimodal.parallel import distributed
  from multimodal.train import preemption, trainer, report
  from multimodal import tasks
  config = cli.CONFIG.value
  workdir = distributed.agree(cli.WORKDIR.value or cli.default_workdir())
  main_process = jax.process_index() == 0
  if main_process:
    print(f"Workdir: {workdir}")
  try:
    task = tasks.get(config.task)(config)
    summary = trainer.train(task, config, workdir)
  except preemption.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except run_errors() as e:
    fail(str(e))
  if main_process:
    print(f"\nResults after {summary['step']} steps "
          f"({summary['wall_time_seconds']:.0f} s), saved to {workdir}/results.json:")
    print(report.results_table(summary["metrics"]))


if __name__ == "__main__":
  main(sys.argv)
