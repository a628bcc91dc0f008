"""Training as a multi-process job: 2 local processes x 4 simulated CPU
devices (jax.distributed over gloo on 127.0.0.1, through the launcher's
`--procs 2 --devices-per-proc 4`) end with the parameters of one process on
8 devices; both processes save checkpoints jointly and a rerun of both
resumes from them; and when one process dies the other stops with an error
instead of hanging."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY_WORLD, killed_on_exit

pytestmark = pytest.mark.integration

STEPS = 6
# A learning rate that does not depend on total_steps (still warming up over
# these few steps), so that a run stopped at step 4 and resumed with
# total_steps=6 follows the same schedule as a straight 6 steps.
ARGS = ["configs/clip_shapes.py:variant=mu/8,text_variant=mu,res=32,batch=16",
        "--config.input.shuffle_buffer=500", "--config.input.tokenizer.vocab_size=128",
        "--config.log_steps=2", "--config.ckpt_steps=2",
        "--config.schedule.decay_type=constant",
        *[f"--config.input.shapes_world.{k}={v}" for k, v in TINY_WORLD.items()]]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MM_") and k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
  return env


def _train(data_dir, workdir, steps, *extra, devices=8, timeout=900):
  args = [sys.executable, "-m", "experiments.train", *ARGS,
          f"--config.input.data_dir={data_dir}", f"--config.total_steps={steps}",
          f"--workdir={workdir}", *extra]
  return subprocess.run(args, cwd=ROOT, env=_env(devices), capture_output=True,
                        text=True, timeout=timeout)


def _train_two_processes(data_dir, workdir, steps):
  return _train(data_dir, workdir, steps, "--procs", "2", "--devices-per-proc", "4",
                devices=4)


def final_params(workdir):
  """The params of a run's latest checkpoint, on host, and its step."""
  import jax
  from multimodal import tasks
  from multimodal.config import config_lib
  from multimodal.parallel import sharding
  from multimodal.train import trainer
  config = config_lib.load_workdir_config(str(workdir))
  task = tasks.get(config.task)(config)
  state = trainer.restore_latest(task, config, str(workdir),
                                 sharding.make_mesh({"data": -1}))
  return int(state["step"]), jax.device_get(state["params"])


def assert_same_params(a, b):
  """Equal to float32 rounding. Gloo sums across processes in another order
  than XLA within one, which moves every param by ~1e-8, except attention
  key biases: their true gradient is zero (softmax ignores a shift shared by
  all keys), so Adam turns their rounding noise into steps of up to the
  learning rate (3e-3 x step/100 while warming up), whatever the order."""
  import jax
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = b
    for key in path:
      y = y[key.key]
    where = jax.tree_util.keystr(path)
    if where.endswith("['key_bias']"):
      np.testing.assert_allclose(x, y, atol=1e-3, err_msg=where)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=where)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def one_process_run(clip_task, data_dir, tmp_path_factory):
  """The reference: one process, 8 devices, STEPS steps. (`clip_task` has
  already trained and cached the tokenizer every process then reads.)"""
  workdir = tmp_path_factory.mktemp("one_process") / "run"
  run = _train(data_dir, workdir, STEPS)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def test_two_processes_train_like_one_and_a_rerun_of_both_resumes(
    one_process_run, data_dir, tmp_path):
  """2 processes x 4 devices train 4 steps, then a rerun of both resumes to
  STEPS: every logged loss and the final parameters are those of the
  uninterrupted 1 process x 8 devices run. (One test, not two: a straight
  two-process run to STEPS would add a job start and compilation to CI and
  check nothing this does not.)"""
  workdir = tmp_path / "two"
  first = _train_two_processes(data_dir, workdir, 4)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  assert "[0] Process 0 of 2" in first.stdout and "[1] Process 1 of 2" in first.stdout
  assert "Resuming" not in first.stdout
  # Only process 0 prints the results table; the evaluators ran on both.
  assert first.stdout.count("Results after 4 steps") == 1
  assert "[0] zero_shot_shape " in first.stdout
  second = _train_two_processes(data_dir, workdir, STEPS)
  assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
  for i in range(2):
    assert f"[{i}] Resuming from step 4 of" in second.stdout
  # Checkpoints written by both processes together.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
  step, params = final_params(workdir)
  reference_step, reference = final_params(one_process_run)
  assert step == reference_step == STEPS
  assert_same_params(params, reference)
  expected = losses(one_process_run)
  assert sorted(losses(workdir)) == sorted(expected) and {2, 4, 6} <= set(expected)
  for step, loss in losses(workdir).items():
    assert loss == pytest.approx(expected[step], rel=1e-6)


def _start_two_processes(data_dir, workdir, logs, steps=100_000):
  """Both processes of a long run, started directly (no launcher: it would
  stop a survivor itself), each logging to its own file."""
  from experiments import launcher
  port = launcher.free_port()
  args = [sys.executable, "-m", "experiments.train", *ARGS,
          f"--config.input.data_dir={data_dir}", f"--config.total_steps={steps}",
          f"--workdir={workdir}"]
  procs = []
  for i in range(2):
    env = {**_env(4), **launcher.local_env(i, 2, port, 4),
           "MM_HEARTBEAT_TIMEOUT": "10"}
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
  return procs


def _wait_for(path, procs, logs, timeout=600):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
    assert time.monotonic() < deadline, f"no {path} after {timeout} s"
    time.sleep(0.2)


def test_sigterm_to_one_process_stops_both_at_one_step_then_a_killed_process_stops_the_other(
    clip_task, data_dir, tmp_path):
  """SIGTERM to one process (what a scheduler sends a preempted host): both
  agree on a step through JAX's preemption sync point, save it jointly and
  exit with code 75. The rerun of both resumes from that step; SIGKILL of
  one of them then makes the other exit with an error within a minute, from
  its own jax.distributed heartbeat and collectives, instead of hanging."""
  from multimodal.train import preemption
  workdir = tmp_path / "run"
  logs = [tmp_path / f"{i}.log" for i in range(2)]
  with killed_on_exit(_start_two_processes(data_dir, workdir, logs)) as procs:
    _wait_for(workdir / "checkpoints" / "2", procs, logs)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=300)
  texts = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [preemption.PREEMPTED_EXIT_CODE] * 2, texts[0][-3000:]
  saved = [int(t.split("saved a checkpoint at step ")[1].split()[0]) for t in texts]
  assert saved[0] == saved[1] and (workdir / "checkpoints" / str(saved[0])).exists()

  with killed_on_exit(_start_two_processes(data_dir, workdir, logs)) as procs:
    # The next regular save (every 2 steps); the preempted step may be odd.
    _wait_for(workdir / "checkpoints" / str(saved[0] + 2 - saved[0] % 2), procs, logs)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    procs[0].wait(timeout=120)
    waited = time.monotonic() - killed_at
  text = logs[0].read_text()
  assert f"Resuming from step {saved[0]} of" in text, text[-3000:]
  assert procs[0].returncode != 0, text[-3000:]
  assert waited < 60, waited


# Process 0 (the coordinator's host) fails alone; the other goes on to a
# barrier of the coordination service (with a 5-minute timeout), as the
# shutdown of jax.distributed does.
_FAIL_ALONE = """
from multimodal.parallel import distributed
distributed.initialize()
import jax
with distributed.leave_at_once_on_error():
  if jax.process_index() == 0:
    raise RuntimeError("process 0 cannot read its disk")
  jax._src.distributed.global_state.client.wait_at_barrier("after the failure", 300_000)
"""


def test_an_error_in_one_process_ends_it_at_once_and_the_other_stops(tmp_path):
  """Without `leave_at_once_on_error` the failing process would wait in
  jax.distributed's shutdown barrier for the other, which waits at its own
  barrier for the failing one: the job hangs for the barriers' timeouts
  (minutes; this test's is 150 s)."""
  from experiments import launcher
  port = launcher.free_port()
  with killed_on_exit([subprocess.Popen(
      [sys.executable, "-c", _FAIL_ALONE], cwd=ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env={**_env(1), **launcher.local_env(i, 2, port, 1), "MM_HEARTBEAT_TIMEOUT": "10"})
      for i in range(2)]) as procs:
    outputs = [p.communicate(timeout=150) for p in procs]
  failed_err = outputs[0][1]
  assert procs[0].returncode == 1, failed_err[-3000:]
  assert "RuntimeError: process 0 cannot read its disk" in failed_err
  assert procs[1].returncode != 0, outputs[1][1][-3000:]
