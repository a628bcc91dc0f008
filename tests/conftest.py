"""Shared fixtures. Eight simulated CPU devices make every test see a real mesh;
the flag must be set before JAX is first imported."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Unit and integration tests compile many tiny programs once each, and run
# them for a few steps: with LLVM's optimisations off XLA compiles them in
# about two thirds of the time (tests/test_dit_model.py: 47 s -> 35 s), and
# the processes those tests start inherit the flag, so an in-process
# reference and a training process still compile alike. The runs that train
# to a threshold (the quality tier) keep XLA's defaults: they start their
# processes with `full_optimisation_env()`, so their numbers do not move.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# Set in full_optimisation_env(): a process started with it keeps XLA's
# defaults even where it imports this module (a test's helper script).
FULL_OPTIMISATION = "MM_TESTS_FULL_OPTIMISATION"
if ("xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    and not os.environ.get(FULL_OPTIMISATION)):
  os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " " + FAST_COMPILE_FLAG
# Under pytest-xdist each worker keeps to its own cores (worker i gets cores
# i, i+n, ...), and so do the processes it starts. Left to share them, every
# worker's XLA, TF and torch thread pools size themselves to all the cores and
# spin against each other's: on 2 cores the suite took 34 min (60 CPU-min),
# pinned 28 min (50 CPU-min).
_worker = os.environ.get("PYTEST_XDIST_WORKER")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _worker and _workers > 1 and hasattr(os, "sched_setaffinity"):
  _cpus = sorted(os.sched_getaffinity(0))
  if len(_cpus) >= _workers:
    os.sched_setaffinity(0, _cpus[int(_worker[2:])::_workers])
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One persistent compilation cache per test session, shared with the
  # training processes tests start: the many tiny runs compile the same
  # programs again and again, and a cache hit turns that into a file read.
  # Fresh each session, so a test never depends on an earlier one.
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="multimodal-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import contextlib  # noqa: E402

import pytest  # noqa: E402

# `./launch.sh test` runs the suite on 2 pytest-xdist workers with --dist
# loadgroup: every test that uses `trained_clip` (below), too slow to train
# once per worker, carries @pytest.mark.xdist_group(TRAINED_CLIP_GROUP) and so
# runs on the worker that trained it.
TRAINED_CLIP_GROUP = "trained_clip"

# A shapes world small enough to build in seconds, shared by every test that
# trains or evaluates.
TINY_WORLD = dict(image_size=32, train_examples=2_000, eval_examples=200, seed=0)


# Every test carries exactly one of these (pyproject.toml describes them):
# `-m unit` is the fast in-process tier, `-m "not quality"` skips the runs
# that train to a threshold.
TIERS = ("unit", "integration", "quality")


def pytest_collection_modifyitems(config, items):
  """Refuses the session when a test has no tier marker or more than one, so
  that `-m unit` and the others keep selecting every test exactly once."""
  wrong = []
  for item in items:
    tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
    if len(tiers) != 1:
      wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
  if wrong:
    raise pytest.UsageError(
        f"each test needs exactly one of the markers {', '.join(TIERS)} "
        "(a module's pytestmark or its own decorator):\n" + "\n".join(wrong))


def full_optimisation_env() -> dict:
  """os.environ without FAST_COMPILE_FLAG: for the processes of the runs
  that train to a threshold, compiled as a user's run is."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f != FAST_COMPILE_FLAG)
  env[FULL_OPTIMISATION] = "1"
  return env


@contextlib.contextmanager
def killed_on_exit(procs):
  """Yields `procs` (subprocess.Popen) and kills, then reaps, any still
  running when the block ends: a failed assertion or a timeout in a test that
  drives several processes leaves none of them behind."""
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def trainings_asked(monkeypatch):
  """The config specs that trained_runs.ensure_trained is asked to train, in
  order; it trains nothing and answers "/cached/clip"."""
  from multimodal.tasks import trained_runs
  asked = []
  monkeypatch.setattr(trained_runs, "ensure_trained",
                      lambda spec, task_class, **kwargs: asked.append(spec) or "/cached/clip")
  return asked


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  from multimodal.data import shapes_builder
  shapes_builder.prepare(str(path), **TINY_WORLD)
  return str(path)


def tiny_clip_config(data_dir, arg="", **overrides):
  """The default CLIP config shrunk to test size, on the tiny world."""
  from configs import clip_shapes
  from multimodal.config import config_lib
  base = "variant=mu/8,text_variant=mu,steps=20,res=32,batch=32"
  config = clip_shapes.get_config(f"{base},{arg}" if arg else base)
  config.input.data_dir = data_dir
  config.input.shapes_world = dict(TINY_WORLD)
  config.input.shuffle_buffer = 500
  config.input.tokenizer.vocab_size = 128
  config.log_steps = 5
  config.ckpt_steps = 10
  for evaluator in config.evals.values():
    evaluator.batch_size = 64
  for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
  return config


@pytest.fixture(scope="session")
def clip_task(data_dir):
  """One tiny contrastive task (tokenizer trained once) for the whole session."""
  from multimodal.tasks import clip
  return clip.ContrastiveTask(tiny_clip_config(data_dir))


@pytest.fixture(scope="session")
def clip_workdir(data_dir, tmp_path_factory):
  """A tiny CLIP run (10 steps, no evals): a vision tower for the VLM and a
  text encoder for the text-conditioned DiT."""
  from multimodal.tasks import clip
  from multimodal.train import trainer
  config = tiny_clip_config(data_dir, total_steps=10)
  for name in list(config.evals):
    del config.evals[name]
  workdir = str(tmp_path_factory.mktemp("clip"))
  trainer.train(clip.ContrastiveTask(config), config, workdir)
  return workdir


def assert_logically_partitioned(params):
  """Every param leaf is a float32 nn.LogicallyPartitioned whose names are
  known logical axes, one per dimension and none repeated."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from multimodal.models import layers
  allowed = set(layers.LOGICAL_AXES) | set(layers.EXTRA_LOGICAL_AXES)
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  # One distinct mesh axis per logical name: logical_to_mesh_axes must accept
  # every spec (it rejects a name repeated within one array).
  rules = [(a, f"mesh_{a}") for a in sorted(allowed)]
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert leaf.value.dtype == jnp.float32, where
    assert len(leaf.names) == leaf.value.ndim, where
    assert all(n is None or n in allowed for n in leaf.names), (where, leaf.names)
    nn.logical_to_mesh_axes(leaf.names, rules)


TINY_RECOGNIZER = "configs/shapes_classifier.py:variant=mu/8,steps=60,res=32,batch=32,crop=True"


@pytest.fixture(scope="session")
def recognizer_workdir(data_dir, tmp_path_factory):
  """A tiny shape-and-colour classifier, trained once per session the way a
  DiT run trains its recognizer on first use. In a process of its own with
  XLA's default optimisations: test_classify holds it to an accuracy."""
  import json
  import subprocess
  import sys
  code = ("import json, sys\n"
          "from multimodal.tasks import trained_runs\n"
          "from multimodal.tasks.classify import ClassificationTask\n"
          "print(trained_runs.ensure_trained(sys.argv[1], ClassificationTask, cache_root=sys.argv[2],"
          " data_dir=sys.argv[3], shapes_world=json.loads(sys.argv[4])))\n")
  run = subprocess.run(
      [sys.executable, "-c", code, TINY_RECOGNIZER, str(tmp_path_factory.mktemp("recognizers")),
       data_dir, json.dumps(TINY_WORLD)],
      cwd=ROOT, env=full_optimisation_env(), capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout.strip().splitlines()[-1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Full-size 64 px images (shape is not learnable from the 32 px tiny world's
# 6 px objects in a test's budget), but few of them.
E2E_WORLD = dict(image_size=64, train_examples=4_000, eval_examples=300, seed=0)


@pytest.fixture(scope="session")
def trained_clip(data_dir, tmp_path_factory):
  """A tiny CLIP trained through the command line (1800 steps, about 12
  minutes on 2 CPU cores), once per session, for every slow test that needs
  a trained checkpoint: (its workdir, the finished training process)."""
  import subprocess
  import sys
  workdir = tmp_path_factory.mktemp("trained_clip") / "run"
  world = [f"--config.input.shapes_world.{k}={v}" for k, v in E2E_WORLD.items()]
  args = [sys.executable, "-m", "experiments.train",
          "configs/clip_shapes.py:variant=mu/8,text_variant=mu,steps=1800,res=64,batch=64",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          "--config.input.tokenizer.vocab_size=128", "--config.ckpt_steps=600", *world]
  run = subprocess.run(args, cwd=ROOT, env=full_optimisation_env(), capture_output=True,
                       text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir, run
