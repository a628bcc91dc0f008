"""Where sweep points run: one device set per parallel point on this
machine (GPUs, TPU chips, or CPU processes), or a SLURM job array."""
from __future__ import annotations

import itertools
import os
import shlex

from multimodal.sweep.points import SweepError

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
