"""What survives what: a training process killed with SIGKILL at a random
step and rerun ends with parameters bit-identical to an uninterrupted run
(CLIP, DiT and the VLM); SIGTERM and SIGINT checkpoint the step in flight
and exit with the documented code; NaN updates are stopped or skipped and
never saved; a workdir that cannot take the run fails before compilation."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_clip_config
from multimodal.config import config_lib
from multimodal.parallel import sharding
from multimodal.train import checkpoint, optim, preemption, trainer, workdir as workdir_lib

STEPS = 12


def _without_evals(config):
  config.evals = type(config.evals)()
  config.total_steps = STEPS
  config.ckpt_steps = 3
  config.log_steps = 1
  return config


def _family_config(family, data_dir, request):
  if family == "clip":
    return _without_evals(tiny_clip_config(data_dir))
  if family == "dit":
    from test_dit_task import tiny_dit_config
    return _without_evals(tiny_dit_config(data_dir))
  from test_vlm import vlm_config
  clip_workdir = request.getfixturevalue("clip_workdir")
  with vlm_config(data_dir, clip_workdir, "align", STEPS).unlocked() as config:
    return _without_evals(config)


def _task(config):
  from multimodal import tasks
  return tasks.get(config.task)(config)


class Run:
  """`experiments.train` on one config and workdir, as a user runs it."""

  def __init__(self, config, workdir):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    spec = os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.json")
    with open(spec, "w") as f:
      f.write(config_lib.to_json(config))
    self.args = [sys.executable, "-m", "experiments.train",
                 f"--config={ROOT}/tests/json_config.py:{spec}", f"--workdir={workdir}"]

  def start(self):
    return subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def logged_step(self) -> int:
    """The newest step in metrics.jsonl (log_steps=1: every step)."""
    try:
      with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
    except FileNotFoundError:
      return 0
    return max(steps, default=0)

  def start_and_wait_for_step(self, step: int, timeout: float = 300):
    process = self.start()
    deadline = time.time() + timeout
    while self.logged_step() < step:
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.time() < deadline, f"no step {step} after {timeout} s"
      time.sleep(0.05)
    return process

  def finish(self) -> subprocess.CompletedProcess:
    result = subprocess.run(self.args, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  def results(self) -> dict:
    with open(os.path.join(self.workdir, "results.json")) as f:
      return json.load(f)

  def checkpoint_steps(self) -> list[int]:
    folder = os.path.join(self.workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


@pytest.fixture(scope="module")
def reference_sha(data_dir, request, tmp_path_factory):
  """params_sha256 of an uninterrupted in-process run, per family."""
  cache = {}

  def get(family):
    if family not in cache:
      config = _family_config(family, data_dir, request)
      workdir = tmp_path_factory.mktemp(f"straight_{family}")
      cache[family] = trainer.train(_task(config), config, str(workdir))["params_sha256"]
    return cache[family]
  return get


# CLIP and the VLM (not DiT too, to keep CI short): DiT's only extras, its
# moving average and its per-step draws, are saved state like any other and
# fold_in(seed, step) like every task's randomness.
@pytest.mark.integration
@pytest.mark.parametrize("family", ["clip", "vlm"])
def test_kill9_at_a_random_step_then_rerun_is_bit_identical(
    family, data_dir, request, reference_sha, tmp_path):
  config = _family_config(family, data_dir, request)
  expected = reference_sha(family)
  run = Run(config, str(tmp_path / "run"))
  kill_after = random.SystemRandom().randint(4, STEPS - 2)  # A checkpoint exists by then.
  process = run.start_and_wait_for_step(kill_after)
  process.kill()  # SIGKILL: no handler, no cleanup, possibly mid-save.
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(run.workdir, "results.json"))
  killed_at = run.logged_step()
  rerun = run.finish()
  assert "Resuming from step" in rerun.stdout, (kill_after, rerun.stdout[-2000:])
  assert run.results()["params_sha256"] == expected, f"killed after step {killed_at}"
  # The rerun's log has each step once: the killed run's lines past the
  # checkpoint it resumed from were dropped, not duplicated.
  with open(os.path.join(run.workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS


@pytest.mark.integration
def test_sigterm_and_sigint_checkpoint_the_step_in_flight_and_exit_75(
    data_dir, request, reference_sha, tmp_path):
  config = _family_config("clip", data_dir, request)
  config.ckpt_steps = 100  # No periodic checkpoint: only the signal saves.
  run = Run(config, str(tmp_path / "run"))
  stopped_at = []
  for signum, after in ((signal.SIGTERM, 3), (signal.SIGINT, 7)):
    process = run.start_and_wait_for_step(after)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
    step = run.checkpoint_steps()[-1]
    assert step >= after and f"saved a checkpoint at step {step}" in stderr
    assert "Traceback" not in stderr
    stopped_at.append(step)
  assert stopped_at[1] > stopped_at[0]
  run.finish()
  # The final params were not changed by stopping twice.
  config.ckpt_steps = 3
  assert run.results()["params_sha256"] == reference_sha("clip")


# ============================================================ NaN policies


def _nan_after(monkeypatch, bad_from_step):
  """Wraps the optimizer so that its update is NaN from step `bad_from_step`
  on, while the loss and the gradients stay finite (as a NaN learning rate
  or an overflowing moment estimate would do)."""
  import jax.numpy as jnp
  import optax
  real = optim.make_optimizer

  def make_optimizer(config, params, total_steps):
    tx, schedule = real(config, params, total_steps)

    def update(updates, state, params=None):
      inner, count = state
      updates, inner = tx.update(updates, inner, params)
      updates = jax.tree.map(
          lambda u: jnp.where(count + 1 >= bad_from_step, jnp.nan, u), updates)
      return updates, (inner, count + 1)
    return optax.GradientTransformation(
        lambda p: (tx.init(p), jnp.zeros((), jnp.int32)), update), schedule
  monkeypatch.setattr(optim, "make_optimizer", make_optimizer)


@contextlib.contextmanager
def _training_with(clip_task, config):
  """The session's clip_task (its tokenizer trained once) on `config`, then
  back on the default tiny config."""
  clip_task.config = config
  try:
    yield
  finally:
    clip_task.config = tiny_clip_config(config.input.data_dir)


def _nan_config(data_dir, policy):
  config = _without_evals(tiny_clip_config(data_dir))
  config.total_steps = 10
  config.ckpt_steps = 5
  config.nan_policy = policy
  return config


@pytest.mark.unit
def test_nan_policy_stop_names_the_first_bad_step_and_keeps_the_last_good_checkpoint(
    clip_task, data_dir, tmp_path, monkeypatch):
  _nan_after(monkeypatch, bad_from_step=7)
  config = _nan_config(data_dir, "stop")
  with _training_with(clip_task, config), pytest.raises(
      trainer.TrainingDivergedError) as info:
    trainer.train(clip_task, config, str(tmp_path / "stop"))
  message = str(info.value)
  assert "at step 7" in message and "last good checkpoint (step 5)" in message
  saved = [int(n) for n in os.listdir(tmp_path / "stop" / "checkpoints") if n.isdigit()]
  assert max(saved) == 5  # Nothing from the bad step on was written.


@pytest.mark.unit
def test_nan_policy_skip_drops_and_counts_the_bad_updates(
    clip_task, data_dir, tmp_path, monkeypatch):
  _nan_after(monkeypatch, bad_from_step=7)
  config = _nan_config(data_dir, "skip")
  with _training_with(clip_task, config):
    summary = trainer.train(clip_task, config, str(tmp_path / "skip"))
  assert summary["step"] == 10
  with open(tmp_path / "skip" / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  assert last["nonfinite_steps"] == 4 and last["first_nonfinite_step"] == 7
  # The params after step 10 are those after step 6: finite, and saved.
  mesh = sharding.make_mesh(config.mesh)
  state = trainer.restore_latest(clip_task, config, str(tmp_path / "skip"), mesh)
  assert int(state["step"]) == 10
  leaves = jax.tree.leaves(jax.device_get(state))
  assert all(np.isfinite(leaf).all() for leaf in leaves)


@pytest.mark.unit
def test_unknown_nan_policy_is_a_config_error(data_dir):
  config = _nan_config(data_dir, "ignore")
  with pytest.raises(config_lib.ConfigError, match="nan_policy"):
    trainer.nan_policy(config)


# ========================================================= workdir problems


def _fails_before_compiling(clip_task, config, workdir, monkeypatch):
  compiled = []
  monkeypatch.setattr(trainer, "make_train_step",
                      lambda *a, **k: compiled.append(1))
  with _training_with(clip_task, config), pytest.raises(
      workdir_lib.WorkdirError) as info:
    trainer.train(clip_task, config, workdir)
  assert not compiled
  return str(info.value)


@pytest.mark.unit
def test_unwritable_workdir_fails_before_compilation(clip_task, data_dir, tmp_path,
                                                   monkeypatch):
  (tmp_path / "a_file").write_text("not a directory")
  workdir = str(tmp_path / "a_file" / "run")
  message = _fails_before_compiling(
      clip_task, _without_evals(tiny_clip_config(data_dir)), workdir, monkeypatch)
  assert workdir in message and "--workdir" in message


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode bits")
def test_read_only_workdir_fails_before_compilation(clip_task, data_dir, tmp_path,
                                                   monkeypatch):
  os.chmod(tmp_path, 0o555)
  try:
    message = _fails_before_compiling(
        clip_task, _without_evals(tiny_clip_config(data_dir)),
        str(tmp_path / "run"), monkeypatch)
  finally:
    os.chmod(tmp_path, 0o755)
  assert "Permission denied" in message


@pytest.mark.unit
def test_full_disk_fails_before_compilation(clip_task, data_dir, tmp_path, monkeypatch):
  import shutil
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage",
                      lambda path: usage._replace(free=1000))
  message = _fails_before_compiling(
      clip_task, _without_evals(tiny_clip_config(data_dir)), str(tmp_path / "run"),
      monkeypatch)
  assert "free" in message and "keep_ckpts" in message


@pytest.mark.unit
def test_checkpoint_size_estimate_is_the_state_bytes():
  abstract = {"a": jax.ShapeDtypeStruct((3, 4), np.float32),
              "b": {"c": jax.ShapeDtypeStruct((5,), np.int32)}}
  assert workdir_lib.state_bytes(abstract) == 3 * 4 * 4 + 5 * 4
