"""`./launch.sh run [CONFIG[:ARGS]] [--workdir DIR] [--config.KEY=VALUE ...] [--print_config]`.

Trains config.task with the generic trainer, then prints the results table.
With --procs, --slurm or --tpu (experiments/launcher.py) it instead fans the
same command out to the processes of a multi-process job; each of those joins
the job through multimodal/distributed.py before anything else uses JAX.
"""
from __future__ import annotations

import sys

from experiments import cli, flags_cli
from experiments.common import fail, user_errors


def run_errors() -> tuple[type[Exception], ...]:
  """What a training run reports as one line (exit status 2): bad input, a
  workdir or checkpoint it cannot use, or a diverged loss."""
  from multimodal.train import checkpoint, trainer, workdir
  return (*user_errors(), checkpoint.CheckpointError, workdir.WorkdirError,
          trainer.TrainingDivergedError)


def main(argv: list[str]) -> None:
  from experiments import launcher
  if flags_cli.wants_help(argv):
    cli.parse_flags(argv, __doc__, extra_help=launcher.help_text())
  try:
    launch_options, argv = launcher.split_args(argv)
    launch = launcher.validate(launch_options) if launch_options else None
  except launcher.LaunchError as e:
    fail(str(e))
  argv = cli.parse_flags(argv, __doc__, extra_names=launcher.FLAGS)
  if launch is not None:
    # Every process and node must agree on the workdir: fix it once, here
    # (absolute: a SLURM job or TPU worker starts from the repository).
    workdir = cli.WORKDIR.value or cli.default_workdir()
    try:
      sys.exit(launcher.launch(launch, _launch_argv(argv), workdir))
    except launcher.LaunchError as e:
      fail(str(e))
  # JAX loads here, once the flags and the config are known to be good.
  from multimodal.parallel import distributed
  try:
    distributed.initialize()
  except distributed.DistributedError as e:
    fail(str(e))
  from multimodal.train import preemption
  with distributed.leave_at_once_on_error(keep_exit_codes=(preemption.PREEMPTED_EXIT_CODE,)):
    _train_and_report()


def _launch_argv(argv: list[str]) -> list[str]:
  """argv as `PROGRAM CONFIG[:ARGS] ...` (the config file found), without
  --workdir: what every process of a launch runs, with the agreed workdir."""
  from experiments import launcher
  i = next(i for i, a in enumerate(argv) if a.startswith("--config="))
  rest = argv[:i] + argv[i + 1:]
  return launcher.without_workdir([rest[0], argv[i].split("=", 1)[1], *rest[1:]])


def _train_and_report() -> None:
  # Heavy imports after the flags: a typo in a key fails in a second.
  import jax
  from multimodal import tasks
  from multimodal.parallel import distributed
  from multimodal.train import preemption, report, trainer
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
