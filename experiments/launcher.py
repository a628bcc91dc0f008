"""`./launch.sh run CONFIG ... (--procs N | --slurm ... | --tpu NAME ...)`:
one training command fanned out to the processes of a multi-process job.

  --procs N [--devices_per_proc K]
      N local copies on 127.0.0.1 (CPU collectives via gloo), joined through
      MM_COORDINATOR / MM_NUM_PROCESSES / MM_PROCESS_ID; K simulated CPU
      devices each. Output is prefixed with each process's index; when one
      fails, the others are stopped after a grace period.
  --slurm --nodes N [--gpus_per_node G] [--task_per_gpu] [--partition P]
          [--time T] [--account A]
      writes WORKDIR/launch.sbatch (`srun ./launch.sh run ...` on every task)
      and submits it with sbatch.
  --tpu NAME --zone Z [--project P] [--remote_dir DIR]
      the same `./launch.sh run ...` on every worker of a Cloud TPU VM, via
      `gcloud compute tpus tpu-vm ssh NAME --worker=all`.
  --dry_run
      prints what would run (and, for --slurm, still writes the script).

The workdir is fixed here, once, before the fan-out, so that every process
writes to (and resumes from) the same place. Everything else on the command
line is passed through unchanged. Every flag here may also be spelt with
dashes (--dry-run, --gpus-per-node).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from multimodal.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("procs", "slurm", "tpu")
# Flag -> (kind, mode it belongs to (None: any mode), meaning). Underscores are
# canonical, as absl's; split_args also takes the dashed spelling.
FLAGS = {
    "procs": (int, "procs", "Run N local processes (CPU collectives via gloo)."),
    "devices_per_proc": (int, "procs", "With --procs: K simulated CPU devices per process."),
    "slurm": (bool, "slurm", "Write WORKDIR/launch.sbatch and submit it with sbatch."),
    "nodes": (int, "slurm", "With --slurm: how many nodes."),
    "gpus_per_node": (int, "slurm", "With --slurm: GPUs per node (#SBATCH --gpus-per-node)."),
    "task_per_gpu": (bool, "slurm", "With --slurm: one task per GPU instead of one per node."),
    "partition": (str, "slurm", "With --slurm: #SBATCH --partition."),
    "time": (str, "slurm", "With --slurm: #SBATCH --time, e.g. 4:00:00."),
    "account": (str, "slurm", "With --slurm: #SBATCH --account."),
    "tpu": (str, "tpu", "Run on every worker of this Cloud TPU VM (gcloud ... ssh --worker=all)."),
    "zone": (str, "tpu", "With --tpu: the TPU VM's zone, e.g. us-central2-b."),
    "project": (str, "tpu", "With --tpu: the Google Cloud project."),
    "remote_dir": (str, "tpu", "With --tpu: the checkout on the workers (default: this one's path)."),
    "dry_run": (bool, None, "Print what would run instead of running it "
                "(--slurm still writes the script)."),
}
GRACE_SECONDS = 10.0  # How long the other local processes get after one fails.


class LaunchError(ValueError):
  """A launcher flag is missing, malformed, or does not fit the others."""


@dataclasses.dataclass
class Launch:
  mode: str
  options: dict


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
  """(launcher options by flag name, every other argument in order).

  `argv[0]` is the program and stays in the second list. Accepts
  `--flag=value` and `--flag value`; boolean flags take no value.
  """
  options: dict = {}
  rest = argv[:1]
  i = 1
  while i < len(argv):
    arg = argv[i]
    name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    name = name.replace("-", "_")
    if name not in FLAGS:
      rest.append(arg)
      i += 1
      continue
    kind = FLAGS[name][0]
    if name in options:
      raise LaunchError(f"--{name} is given twice.")
    if kind is bool:
      if eq:
        raise LaunchError(f"--{name} takes no value (got {arg}).")
      options[name] = True
      i += 1
      continue
    if not eq:
      if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise LaunchError(f"--{name} needs a value.")
      value = argv[i + 1]
      i += 1
    i += 1
    if kind is int:
      try:
        value = int(value)
      except ValueError:
        raise LaunchError(f"--{name}={value!r} must be a whole number.") from None
    options[name] = value
  return options, rest


def validate(options: dict) -> Launch:
  """The one launch mode the options ask for, or a LaunchError naming the fix."""
  modes = [m for m in MODES if m in options]
  if not modes:
    given = ", ".join(f"--{name}" for name in options)
    raise LaunchError(f"{given} needs one of --procs N, --slurm or --tpu NAME.")
  if len(modes) > 1:
    raise LaunchError(
        f"choose one of --procs, --slurm and --tpu, not "
        f"{' and '.join('--' + m for m in modes)}.")
  mode = modes[0]
  for name in options:
    owner = FLAGS[name][1]
    if owner not in (None, mode):
      raise LaunchError(f"--{name} belongs with --{owner}, not --{mode}.")
  def positive(name, minimum=1):
    if name in options and options[name] < minimum:
      raise LaunchError(f"--{name}={options[name]} must be at least {minimum}.")
  if mode == "procs":
    positive("procs")
    positive("devices_per_proc")
  elif mode == "slurm":
    if "nodes" not in options:
      raise LaunchError("--slurm needs --nodes N (and --gpus_per_node G on GPU nodes).")
    positive("nodes")
    positive("gpus_per_node", 0)
    if options.get("task_per_gpu") and not options.get("gpus_per_node"):
      raise LaunchError("--task_per_gpu needs --gpus_per_node G.")
  else:
    if not options["tpu"]:
      raise LaunchError("--tpu needs the TPU VM's name.")
    if not options.get("zone"):
      raise LaunchError("--tpu needs --zone Z (e.g. --zone us-central2-b).")
  return Launch(mode, options)


def _workdir_index(rest: list[str]) -> int | None:
  for i, arg in enumerate(rest):
    if arg == "--workdir" or arg.startswith("--workdir="):
      return i
  return None


def without_workdir(rest: list[str]) -> list[str]:
  """`rest` without its --workdir (`--workdir=DIR` or `--workdir DIR`)."""
  i = _workdir_index(rest)
  if i is None:
    return list(rest)
  return rest[:i] + rest[i + (1 if "=" in rest[i] else 2):]


def help_text() -> str:
  """The launcher's flags for `./launch.sh run --help`."""
  lines = ["\nMulti-process launch (experiments/launcher.py; --name-with-dashes also works):"]
  for name, (kind, _, meaning) in FLAGS.items():
    value = {int: "=N", str: "=VALUE", bool: ""}[kind]
    lines.append(f"  --{name}{value}: {meaning}")
  return "\n".join(lines)


def with_workdir(rest: list[str], workdir: str) -> list[str]:
  """`rest` with `--workdir=workdir` appended unless it already names one."""
  return list(rest) if _workdir_index(rest) is not None else [*rest, f"--workdir={workdir}"]


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def local_env(index: int, count: int, port: int,
              devices_per_proc: int | None, base_xla_flags: str = "") -> dict:
  """The environment of local process `index` of `count` (added to os.environ)."""
  env = {distributed.COORDINATOR: f"127.0.0.1:{port}",
         distributed.NUM_PROCESSES: str(count),
         distributed.PROCESS_ID: str(index),
         "PYTHONUNBUFFERED": "1"}
  if devices_per_proc:
    kept = [f for f in base_xla_flags.split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        [*kept, f"--xla_force_host_platform_device_count={devices_per_proc}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def local_command(rest: list[str]) -> list[str]:
  return [sys.executable, "-m", "experiments.train", *rest[1:]]


def sbatch_script(rest: list[str], options: dict, workdir: str, repo: str = REPO) -> str:
  """The batch script: one `srun ./launch.sh run ...` over every task."""
  gpus = options.get("gpus_per_node") or 0
  tasks = gpus if options.get("task_per_gpu") else 1
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={shlex.quote('mm-' + os.path.basename(os.path.normpath(workdir)))}",
           f"#SBATCH --nodes={options['nodes']}",
           f"#SBATCH --ntasks-per-node={tasks}"]
  if gpus:
    lines.append(f"#SBATCH --gpus-per-node={gpus}")
  for name in ("partition", "time", "account"):
    if options.get(name):
      lines.append(f"#SBATCH --{name}={options[name]}")
  lines += [
      f"#SBATCH --output={os.path.join(repo, workdir, 'slurm-%j.out')}",
      "# Written by `./launch.sh run ... --slurm`; resubmit with `sbatch` on this file:",
      "# every task resumes from the workdir's latest checkpoint.",
      "set -euo pipefail",
      f"cd {shlex.quote(repo)}",
      "# Install or update .venv once, here, before the tasks share it.",
      "./launch.sh install",
      f"srun --kill-on-bad-exit=1 ./launch.sh run {shlex.join(rest[1:])}",
  ]
  return "\n".join(lines) + "\n"


def tpu_command(rest: list[str], options: dict, repo: str = REPO) -> list[str]:
  """The gcloud command that runs the training command on every TPU worker."""
  # Installing first, apart from the run, keeps pip's output out of the
  # run's log and fails on the worker whose environment cannot be built.
  remote = (f"cd {shlex.quote(options.get('remote_dir') or repo)} && ./launch.sh install && "
            f"{distributed.MODE}=auto ./launch.sh run {shlex.join(rest[1:])}")
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", options["tpu"],
             f"--zone={options['zone']}"]
  if options.get("project"):
    command.append(f"--project={options['project']}")
  return command + ["--worker=all", f"--command={remote}"]


def _pump(stream, prefix: bytes, out, lock: threading.Lock) -> None:
  """Copies a child's output line by line, each line (and each \\r-redrawn
  progress bar) prefixed with the child's index."""
  for line in iter(stream.readline, b""):
    text = prefix + line.replace(b"\r", b"\r" + prefix)
    with lock:
      if hasattr(out, "buffer"):
        out.buffer.write(text)
      else:
        out.write(text.decode(errors="replace"))
      out.flush()
  stream.close()


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def run_local(rest: list[str], count: int, devices_per_proc: int | None,
              grace: float = GRACE_SECONDS) -> int:
  """Runs `count` local processes to completion; the first failure's code."""
  port = free_port()
  command = local_command(rest)
  lock = threading.Lock()
  procs, pumps = [], []
  # A SIGTERM to the launcher stops the children too (via the finally below).
  previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    for i in range(count):
      env = {**os.environ, **local_env(i, count, port, devices_per_proc,
                                       os.environ.get("XLA_FLAGS", ""))}
      proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
      procs.append(proc)
      for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        pump = threading.Thread(target=_pump, args=(stream, f"[{i}] ".encode(), out, lock),
                                daemon=True)
        pump.start()
        pumps.append(pump)
    failed_at, failure = None, 0
    while any(p.poll() is None for p in procs):
      if failed_at is None:
        failing = [p for p in procs if p.poll() not in (None, 0)]
        if failing:
          failed_at, failure = time.monotonic(), _exit_code(failing[0].returncode)
          print(f"launcher: process {procs.index(failing[0])} exited with status "
                f"{failure}; stopping the others in {grace:.0f} s.",
                file=sys.stderr, flush=True)
      elif time.monotonic() - failed_at > grace:
        break
      time.sleep(0.2)
  finally:
    _stop(procs)
    signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
      pump.join(timeout=5)
  if not failure:
    failure = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
  return failure


def _stop(procs, timeout: float = 10.0) -> None:
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    p.terminate()
  deadline = time.monotonic() + timeout
  for p in alive:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _print_env_command(env: dict, command: list[str]) -> None:
  shown = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
  print(" ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()),
        shlex.join(command))


def launch(launch: Launch, rest: list[str], workdir: str) -> int:
  """Fans the training command `rest` (argv, program first) out; exit status."""
  options, dry_run = launch.options, bool(launch.options.get("dry_run"))
  rest = with_workdir(rest, workdir)
  if launch.mode == "procs":
    count, devices = options["procs"], options.get("devices_per_proc")
    if dry_run:
      port = free_port()
      for i in range(count):
        _print_env_command(local_env(i, count, port, devices, os.environ.get("XLA_FLAGS", "")),
                           local_command(rest))
      return 0
    return run_local(rest, count, devices)
  if launch.mode == "slurm":
    script = sbatch_script(rest, options, workdir)
    path = os.path.join(REPO, workdir, "launch.sbatch")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
    command = ["sbatch", path]
    if dry_run:
      print(f"# {path}:")
      print(script, end="")
      print(f"# Would run: {shlex.join(command)}")
      return 0
    print(f"Wrote {path}; submitting.", flush=True)
    return _run_tool(command, "sbatch", "on a SLURM login node")
  command = tpu_command(rest, options)
  if not os.path.isabs(workdir):
    print(f"note: every TPU worker writes its shards of each checkpoint to "
          f"{workdir}: for a checkpoint that restores, give --workdir on storage "
          "all workers mount (NFS, Filestore, gcsfuse).", file=sys.stderr)
  if dry_run:
    print(shlex.join(command))
    return 0
  return _run_tool(command, "gcloud", "with the Google Cloud SDK installed")


def _run_tool(command: list[str], tool: str, where: str) -> int:
  try:
    return subprocess.call(command)
  except FileNotFoundError:
    raise LaunchError(f"{tool} is not installed here: run this {where}, or add "
                      "--dry_run to print the command.") from None
