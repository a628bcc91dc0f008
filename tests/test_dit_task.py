"""The DiT family runs through the one generic trainer: it trains, keeps an
EMA, checkpoints, writes sample grids and reports its held-out loss."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_WORLD, full_optimisation_env
from multimodal.evaluators import generation
from multimodal.tasks import dit as dit_task
from multimodal.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_dit_config(data_dir, recognizer_workdir=None, steps=40):
  from configs import dit_shapes
  config = dit_shapes.get_config(f"variant=mu/8,steps={steps},res=32,batch=32")
  config.input.data_dir = data_dir
  config.input.shapes_world = dict(TINY_WORLD)
  config.input.shuffle_buffer = 500
  config.schedule.warmup_steps = 5
  config.log_steps = 5
  config.ckpt_steps = 20
  config.ema_decay = 0.9
  config.evals.samples.steps = 4
  config.evals.samples.num = 16
  config.evals.val_loss.batch_size = 64
  if recognizer_workdir is None:
    del config.evals["quality"]
  else:
    config.evals.quality.recognizer_workdir = recognizer_workdir
    config.evals.quality.per_class = 1
    config.evals.quality.steps = 4
    config.evals.quality.batch_size = 32
  return config


@pytest.mark.integration
def test_dit_trains_through_the_generic_trainer(data_dir, recognizer_workdir, tmp_path):
  config = tiny_dit_config(data_dir, recognizer_workdir)
  # Epsilon prediction, whose trivial loss has a closed form (below).
  config.diffusion.prediction = "epsilon"
  task = dit_task.DiffusionTask(config)
  workdir = tmp_path / "dit"
  summary = trainer.train(task, config, str(workdir))

  metrics = summary["metrics"]
  assert np.isfinite(metrics["val_loss/loss"]), metrics
  assert metrics["samples/pixel_std"] > 0, metrics  # Not a constant image.
  # Generation quality: 56 trained classes x 1 sample, judged by the recognizer.
  assert metrics["quality/num_samples"] == 56, metrics
  assert 0 <= metrics["quality/conditional_accuracy"] <= 1
  assert metrics["quality/fid"] > 0 and np.isfinite(metrics["quality/fid"])
  assert metrics["quality/recognizer_real_colour_accuracy"] > 0.5, metrics
  grid = np.asarray(Image.open(workdir / "samples_latest.png"))
  # 16 samples in rows of 8 colours, 32 px each with 2 px gaps.
  assert grid.shape == (2 * 34 + 2, 8 * 34 + 2, 3)
  assert (workdir / "samples_001.png").exists()
  assert (workdir / "checkpoints" / "40").is_dir()

  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in logged if "loss" in r]
  assert all(np.isfinite(losses))
  # The zero-initialised output predicts no noise, whose MSE is exactly
  # E[noise^2] = 1: after 40 steps the model must beat that trivial guess.
  mses = [r["mse"] for r in logged if "mse" in r]
  assert abs(mses[0] - 1) < 0.1, mses
  assert mses[-1] < 0.9, mses
  assert all(r["vb"] > 0 for r in logged if "vb" in r)  # learn_sigma is on.

  # The sample command draws from the EMA params of the latest checkpoint.
  def sample(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
  out = workdir / "red.png"
  run = sample("--prompt=a red circle", "--n=3", "--steps=3", f"--out={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert str(out) in run.stdout
  assert np.asarray(Image.open(out)).shape == (34 + 2, 3 * 34 + 2, 3)
  bad = sample("--prompt=a circle")
  assert bad.returncode == 2 and "exactly one colour" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.unit
def test_label_from_prompt_matches_object_pair_label(data_dir):
  task = dit_task.DiffusionTask(tiny_dit_config(data_dir))
  # object_pair_label: shape * 8 + colour; circle = 0, red = 0, hexagon = 7.
  assert task.label_from_prompt("a red circle") == 0
  assert task.label_from_prompt("A White Hexagon.") == 7 * 8 + 7
  assert task.label_from_prompt("a large blue star in the center") == 3 * 8 + 5


@pytest.mark.unit
def test_image_grid_layout():
  images = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
  grid = generation.image_grid(images, cols=2, gap=1)
  assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
  assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 127 and grid[6, 1, 0] == 255
  assert grid[6, 6, 0] == 128  # The empty cell keeps the grey background.


_SAMPLE_IN_PARTS = """
import sys
import jax
import numpy as np
sys.path.insert(0, "tests")
from test_dit_task import tiny_dit_config
from multimodal.parallel import sharding
from multimodal.tasks import dit as dit_task

data_dir, out = sys.argv[1:3]
config = tiny_dit_config(data_dir)
task = dit_task.DiffusionTask(config)
mesh = sharding.make_mesh(config.mesh)
# Random weights throughout: adaLN-zero's init would make every output 0.
params = jax.tree.map(lambda x: x.value, task.init(jax.random.key(0)),
                      is_leaf=lambda x: hasattr(x, "names"))
leaves, treedef = jax.tree.flatten(params)
keys = jax.random.split(jax.random.key(1), len(leaves))
params = treedef.unflatten([0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
condition = task.condition_for_labels(np.arange(8))
result = {}
for size in (0, 4):
  config.sample_microbatch_size = size
  sample = task.sampler(mesh, steps=3, cfg_scale=3.0)
  with sharding.mesh_context(mesh):
    result[f"samples{size}"] = np.asarray(sample(params, condition))
    result[f"matmuls{size}"] = str(jax.make_jaxpr(sample)(params, condition)).count("dot_general")
np.savez(out, **result)
"""


@pytest.mark.integration
def test_sampler_in_microbatches_draws_the_same_samples(data_dir, tmp_path):
  """config.sample_microbatch_size: the guided batch (8 labels, doubled to
  16) goes through the model in 4 parts of 4 rows, on the 8-device mesh,
  and the samples are the whole batch's. In a process compiled as a user's
  run is: under the suite's unoptimised compiles (conftest) the two
  programs' float rounding drifts apart by up to 2e-3 over the three steps."""
  out = tmp_path / "samples.npz"
  run = subprocess.run([sys.executable, "-c", _SAMPLE_IN_PARTS, data_dir, str(out)],
                       cwd=ROOT, env=full_optimisation_env(), capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = np.load(out)
  assert result["samples0"].std() > 0.1
  np.testing.assert_allclose(result["samples4"], result["samples0"], atol=1e-5)
  # The model, written out for each part.
  assert result["matmuls4"] == 4 * result["matmuls0"]
