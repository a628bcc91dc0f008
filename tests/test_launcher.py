"""The multi-process launcher (`./launch.sh run ... --procs | --slurm |
--tpu`) and the environment detection every process starts with: the exact
sbatch script and gcloud command, one clear line for a bad combination of
flags, and local processes supervised so that one failure stops them all."""
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from experiments import launcher
from multimodal.parallel import distributed


def _cli(*args, timeout=120):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MM_")}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


# -- Flags ---------------------------------------------------------------------


@pytest.mark.unit
def test_launcher_flags_are_split_from_the_training_flags():
  options, rest = launcher.split_args(
      ["train", "configs/clip_shapes.py:variant=S/8", "--procs", "2",
       "--config.lr=3e-4", "--devices-per-proc=4", "--dry-run", "--workdir", "runs/x"])
  assert options == {"procs": 2, "devices_per_proc": 4, "dry_run": True}
  assert rest == ["train", "configs/clip_shapes.py:variant=S/8", "--config.lr=3e-4",
                  "--workdir", "runs/x"]


@pytest.mark.parametrize("argv, message", [
    (["--procs"], "--procs needs a value."),
    (["--procs", "--dry-run"], "--procs needs a value."),
    (["--procs=two"], "--procs='two' must be a whole number."),
    (["--slurm=yes"], "--slurm takes no value (got --slurm=yes)."),
    (["--nodes", "2", "--nodes=3"], "--nodes is given twice."),
])
@pytest.mark.unit
def test_malformed_launcher_flags(argv, message):
  with pytest.raises(launcher.LaunchError) as info:
    launcher.split_args(["train", *argv])
  assert str(info.value) == message


@pytest.mark.parametrize("options, message", [
    ({"dry_run": True}, "--dry_run needs one of --procs N, --slurm or --tpu NAME."),
    ({"procs": 2, "slurm": True, "nodes": 2},
     "choose one of --procs, --slurm and --tpu, not --procs and --slurm."),
    ({"procs": 2, "nodes": 2}, "--nodes belongs with --slurm, not --procs."),
    ({"slurm": True, "nodes": 2, "zone": "z"}, "--zone belongs with --tpu, not --slurm."),
    ({"tpu": "t", "zone": "z", "devices_per_proc": 4},
     "--devices_per_proc belongs with --procs, not --tpu."),
    ({"procs": 0}, "--procs=0 must be at least 1."),
    ({"slurm": True}, "--slurm needs --nodes N (and --gpus_per_node G on GPU nodes)."),
    ({"slurm": True, "nodes": 2, "task_per_gpu": True},
     "--task_per_gpu needs --gpus_per_node G."),
    ({"tpu": "t"}, "--tpu needs --zone Z (e.g. --zone us-central2-b)."),
])
@pytest.mark.unit
def test_invalid_launcher_combinations(options, message):
  with pytest.raises(launcher.LaunchError) as info:
    launcher.validate(options)
  assert str(info.value) == message


@pytest.mark.integration
def test_bad_combination_is_one_line_from_the_command_line():
  run = _cli("configs/clip_shapes.py", "--procs", "2", "--slurm", "--nodes", "2")
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == (
      "error: choose one of --procs, --slurm and --tpu, not --procs and --slurm.")
  assert "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.integration
def test_config_mistake_fails_before_anything_is_launched(tmp_path):
  run = _cli("configs/clip_shapes.py", "--config.lrr=1", "--slurm", "--nodes=2",
             "--dry-run", f"--workdir={tmp_path / 'run'}")
  assert run.returncode == 2
  assert "unknown config key 'lrr'" in run.stderr.strip().splitlines()[-1]
  assert run.stdout == "" and not (tmp_path / "run").exists()


# -- SLURM ---------------------------------------------------------------------


@pytest.mark.unit
def test_sbatch_script():
  rest = ["train", "configs/clip_shapes.py:variant=S/8", "--config.lr=3e-4",
          "--config.input.data=captions:/data/my pairs.tsv", "--workdir=runs/big"]
  options = {"slurm": True, "nodes": 4, "gpus_per_node": 8, "partition": "gpu",
             "time": "4:00:00"}
  assert launcher.sbatch_script(rest, options, "runs/big", repo="/home/me/mm") == """\
#!/bin/bash
#SBATCH --job-name=mm-big
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=4:00:00
#SBATCH --output=/home/me/mm/runs/big/slurm-%j.out
# Written by `./launch.sh run ... --slurm`; resubmit with `sbatch` on this file:
# every task resumes from the workdir's latest checkpoint.
set -euo pipefail
cd /home/me/mm
# Install or update .venv once, here, before the tasks share it.
./launch.sh install
srun --kill-on-bad-exit=1 ./launch.sh run configs/clip_shapes.py:variant=S/8 \
--config.lr=3e-4 '--config.input.data=captions:/data/my pairs.tsv' --workdir=runs/big
"""


@pytest.mark.unit
def test_sbatch_script_with_one_task_per_gpu_and_an_account():
  options = {"slurm": True, "nodes": 2, "gpus_per_node": 4, "task_per_gpu": True,
             "account": "lab"}
  script = launcher.sbatch_script(["train", "--workdir=/shared/r"], options,
                                  "/shared/r", repo="/r")
  assert "#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n" in script
  assert "#SBATCH --account=lab\n#SBATCH --output=/shared/r/slurm-%j.out\n" in script
  assert script.endswith("srun --kill-on-bad-exit=1 ./launch.sh run --workdir=/shared/r\n")


@pytest.mark.integration
def test_slurm_dry_run_writes_the_script_and_prints_the_command(tmp_path):
  workdir = tmp_path / "run"
  run = _cli("configs/clip_shapes.py:steps=50", "--slurm", "--nodes", "4",
             "--gpus-per-node", "8", "--dry-run", f"--workdir={workdir}")
  assert run.returncode == 0, run.stderr[-2000:]
  path = workdir / "launch.sbatch"
  script = launcher.sbatch_script(
      ["train", "configs/clip_shapes.py:steps=50", f"--workdir={workdir}"],
      {"nodes": 4, "gpus_per_node": 8}, str(workdir))
  assert path.read_text() == script
  assert run.stdout == f"# {path}:\n{script}# Would run: sbatch {path}\n"


# -- Cloud TPU -------------------------------------------------------------------


@pytest.mark.unit
def test_tpu_command():
  rest = ["train", "configs/clip_shapes.py", "--config.input.data=folder:/data/my images",
          "--workdir=/mnt/shared/run"]
  options = {"tpu": "my-tpu", "zone": "us-central2-b", "project": "proj"}
  command = launcher.tpu_command(rest, options, repo="/home/me/mm")
  remote = ("cd /home/me/mm && ./launch.sh install && MM_DISTRIBUTED=auto ./launch.sh run "
            "configs/clip_shapes.py '--config.input.data=folder:/data/my images' --workdir=/mnt/shared/run")
  assert command == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                     "--zone=us-central2-b", "--project=proj", "--worker=all",
                     f"--command={remote}"]
  printed = shlex.join(command)
  assert printed == (
      "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --project=proj "
      "--worker=all '--command=cd /home/me/mm && ./launch.sh install && "
      "MM_DISTRIBUTED=auto ./launch.sh run configs/clip_shapes.py '\"'\"'--config.input.data=folder:/data/my images'\"'\"' "
      "--workdir=/mnt/shared/run'")
  # What the remote shell runs is exactly the local arguments.
  remote_args = shlex.split(shlex.split(printed)[-1].split("=", 1)[1])
  assert remote_args[remote_args.index("run") + 1:] == rest[1:]


@pytest.mark.unit
def test_tpu_command_in_another_directory():
  command = launcher.tpu_command(["train", "--workdir=w"], {
      "tpu": "t", "zone": "z", "remote_dir": "~/my repo"}, repo="/local")
  assert command[-1] == ("--command=cd '~/my repo' && ./launch.sh install && "
                         "MM_DISTRIBUTED=auto ./launch.sh run --workdir=w")
  assert "--project" not in " ".join(command)


@pytest.mark.integration
def test_tpu_dry_run_fixes_a_workdir_for_every_worker():
  run = _cli("configs/clip_shapes.py", "--tpu", "my-tpu", "--zone", "europe-west4-a",
             "--dry-run")
  assert run.returncode == 0, run.stderr[-2000:]
  printed = run.stdout.strip().splitlines()[-1]
  command = shlex.split(printed)
  assert command[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                         "--zone=europe-west4-a", "--worker=all"]
  remote = shlex.split(command[8].split("=", 1)[1])
  assert remote[:9] == ["cd", ROOT, "&&", "./launch.sh", "install", "&&",
                        "MM_DISTRIBUTED=auto", "./launch.sh", "run"]
  assert remote[9] == "configs/clip_shapes.py"
  assert remote[10].startswith("--workdir=runs/clip_shapes-")


# -- Local processes -------------------------------------------------------------


@pytest.mark.unit
def test_local_process_environment():
  env = launcher.local_env(1, 2, 1234, 4, "--xla_foo=1 --xla_force_host_platform_device_count=8")
  assert env == {"MM_COORDINATOR": "127.0.0.1:1234", "MM_NUM_PROCESSES": "2",
                 "MM_PROCESS_ID": "1", "PYTHONUNBUFFERED": "1",
                 "XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=4",
                 "JAX_PLATFORMS": "cpu"}
  assert "XLA_FLAGS" not in launcher.local_env(0, 2, 1234, None)


@pytest.mark.integration
def test_procs_dry_run_prints_every_process():
  run = _cli("configs/clip_shapes.py", "--procs", "2", "--devices-per-proc", "4",
             "--dry-run", "--workdir=runs/x")
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[0].startswith("MM_COORDINATOR=127.0.0.1:")
    assert words[1:3] == ["MM_NUM_PROCESSES=2", f"MM_PROCESS_ID={i}"]
    # A relative --workdir is the caller's directory's, fixed for every process.
    assert words[-4:] == ["-m", "experiments.train", "configs/clip_shapes.py",
                          f"--workdir={os.path.join(ROOT, 'runs', 'x')}"]


@pytest.mark.integration
def test_one_failing_process_stops_the_others(monkeypatch, capfd):
  script = ("import os, sys, time\n"
            "i = int(os.environ['MM_PROCESS_ID'])\n"
            "print(f'hello from {i} of', os.environ['MM_NUM_PROCESSES'], flush=True)\n"
            "if i == 1:\n  sys.exit(3)\n"
            "time.sleep(120)\n")
  monkeypatch.setattr(launcher, "local_command", lambda rest: [sys.executable, "-c", script])
  start = time.monotonic()
  assert launcher.run_local(["train"], 3, None, grace=5) == 3
  assert time.monotonic() - start < 30
  out, err = capfd.readouterr()
  assert sorted(out.splitlines()) == [f"[{i}] hello from {i} of 3" for i in range(3)]
  assert "launcher: process 1 exited with status 3; stopping the others" in err


@pytest.mark.integration
def test_all_processes_succeeding_is_success(monkeypatch, capfd):
  monkeypatch.setattr(launcher, "local_command",
                      lambda rest: [sys.executable, "-c", "print('done')"])
  assert launcher.run_local(["train"], 2, None) == 0
  assert sorted(capfd.readouterr()[0].splitlines()) == ["[0] done", "[1] done"]


# -- Environment detection -------------------------------------------------------


def _plan(env, tpu_workers=1):
  return distributed.plan(env, tpu_workers=lambda: tpu_workers)


@pytest.mark.unit
def test_single_process_by_default():
  plan = _plan({})
  assert not plan.distributed and plan.how == "single process"
  assert not _plan({"MM_COORDINATOR": "h:1", "MM_NUM_PROCESSES": "1",
                    "MM_PROCESS_ID": "0"}).distributed


@pytest.mark.unit
def test_explicit_coordinator():
  plan = _plan({"MM_COORDINATOR": "10.0.0.2:8476", "MM_NUM_PROCESSES": "4",
                "MM_PROCESS_ID": "3", "MM_HEARTBEAT_TIMEOUT": "15"})
  assert plan.kwargs == dict(coordinator_address="10.0.0.2:8476", num_processes=4,
                             process_id=3, cluster_detection_method="deactivate",
                             initialization_timeout=300, heartbeat_timeout_seconds=15)


@pytest.mark.parametrize("env, message", [
    ({"MM_COORDINATOR": "h:1"},
     "MM_COORDINATOR is set but MM_NUM_PROCESSES, MM_PROCESS_ID is not"),
    ({"MM_COORDINATOR": "h", "MM_NUM_PROCESSES": "2", "MM_PROCESS_ID": "0"},
     "MM_COORDINATOR='h' must be host:port."),
    ({"MM_COORDINATOR": "h:1", "MM_NUM_PROCESSES": "2", "MM_PROCESS_ID": "2"},
     "MM_PROCESS_ID=2 must be below MM_NUM_PROCESSES=2."),
    ({"MM_COORDINATOR": "h:1", "MM_NUM_PROCESSES": "two", "MM_PROCESS_ID": "0"},
     "MM_NUM_PROCESSES='two' must be an integer >= 1."),
    ({"MM_DISTRIBUTED": "yes"}, "MM_DISTRIBUTED='yes' must be 'auto' or 'off'."),
])
@pytest.mark.unit
def test_inconsistent_environment(env, message):
  with pytest.raises(distributed.DistributedError, match=message.replace("(", r"\(")):
    _plan(env)


SLURM = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[003-006]",
         "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


@pytest.mark.unit
def test_slurm_one_task_per_node_keeps_every_gpu(monkeypatch):
  for key, value in SLURM.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
  plan = distributed.plan(tpu_workers=lambda: 1)
  # JAX's choice of coordinator: the step's first node, a port from the job id.
  assert plan.kwargs == dict(coordinator_address=f"gpu003:{1234 % 4096 + 61440}",
                             num_processes=4, process_id=2,
                             cluster_detection_method="deactivate",
                             initialization_timeout=300, heartbeat_timeout_seconds=60)


@pytest.mark.unit
def test_slurm_task_per_gpu_and_single_task():
  plan = _plan({**SLURM, "SLURM_NTASKS": "32", "SLURM_STEP_TASKS_PER_NODE": "8(x4)"})
  assert plan.kwargs == dict(cluster_detection_method="slurm", initialization_timeout=300,
                             heartbeat_timeout_seconds=60)
  assert (plan.num_processes, plan.process_id) == (32, 2)
  assert not _plan({**SLURM, "SLURM_NTASKS": "1"}).distributed
  # The batch script itself (no srun step) is not a multi-process job.
  assert not _plan({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}).distributed


@pytest.mark.unit
def test_tpu_slice_and_explicit_modes():
  assert _plan({}, tpu_workers=4).kwargs == dict(initialization_timeout=300,
                                                 heartbeat_timeout_seconds=60)
  assert _plan({"MM_DISTRIBUTED": "auto"}).distributed
  assert not _plan({**SLURM, "MM_DISTRIBUTED": "off"}, tpu_workers=4).distributed
  assert _plan({"MM_DISTRIBUTED": "auto", "MM_INIT_TIMEOUT": "30"}).kwargs[
      "initialization_timeout"] == 30
