"""Tiny models trained through the real command line come out far above
chance: a CLIP (1800 steps, conftest's `trained_clip`) at zero-shot shape and colour
classification and at retrieval, with `eval` re-running its evaluators; a
class-conditional DiT at drawing the (shape, colour) it is asked for.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import E2E_WORLD, ROOT, TRAINED_CLIP_GROUP, full_optimisation_env
from multimodal.tasks.clip import ContrastiveTask
from multimodal.train import trainer

pytestmark = pytest.mark.quality


@pytest.mark.xdist_group(TRAINED_CLIP_GROUP)
def test_tiny_clip_learns_shapes_zero_shot(trained_clip):
  workdir, run = trained_clip
  assert "zero_shot_shape" in run.stdout  # The printed results table.
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert (workdir / name).exists(), name
  assert (workdir / "checkpoints" / "1800").is_dir()
  assert any((workdir / "tensorboard").iterdir())
  summary = json.loads((workdir / "results.json").read_text())
  results = summary["metrics"]
  # The digest names the checkpoint's final parameters.
  from multimodal.tasks import trained_runs
  assert summary["params_sha256"] == trainer.params_sha256(trained_runs.eval_params(str(workdir), ContrastiveTask))
  chance = 1 / 8
  assert results["zero_shot_shape/acc1"] > 3 * chance, results
  assert results["zero_shot_colour/acc1"] > 3 * chance, results
  assert results["zero_shot_colour_novel/acc1"] > 3 * chance, results
  # Chance recall@10 is 10/300 from text to image.
  assert results["retrieval/text_to_image_recall@10"] > 0.3, results

  evaluation = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"],
      cwd=ROOT, env=full_optimisation_env(), capture_output=True, text=True, timeout=600)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  again = json.loads((workdir / "eval_results.json").read_text())["metrics"]
  for key in ("zero_shot_colour/acc1", "retrieval/text_to_image_recall@10"):
    assert again[key] == pytest.approx(results[key], abs=1e-6)

  # --split: the same evaluators on training images, named for that split;
  # zero_shot_colour and zero_shot_colour_novel become one.
  on_train = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
       "--split=train[:300]"], cwd=ROOT, env=full_optimisation_env(),
       capture_output=True, text=True, timeout=600)
  assert on_train.returncode == 0, on_train.stderr[-3000:]
  train = json.loads((workdir / "eval_results.json").read_text())["metrics"]
  assert train["zero_shot_colour@train[:300]/acc1"] > 3 * chance, train
  assert not any(key.startswith("zero_shot_colour_novel") for key in train), train
  assert not any(key.startswith("zero_shot_colour/") for key in train), train


def test_tiny_dit_generates_the_asked_for_class(data_dir, tmp_path):
  """A class-conditional DiT through the command line; its samples are judged
  by a recognizer that the run trains itself on first use."""
  workdir = tmp_path / "dit"
  world = [f"--config.input.shapes_world.{k}={v}" for k, v in E2E_WORLD.items()]
  args = [sys.executable, "-m", "experiments.train",
          "configs/dit_shapes.py:variant=mu/4,steps=1500,res=16,batch=64",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          "--config.evals.quality.recognizer=configs/shapes_classifier.py:"
          "res=16,crop=True,steps=400",
          "--config.evals.quality.per_class=4", "--config.evals.quality.steps=25",
          "--config.evals.samples.steps=25", *world]
  run = subprocess.run(args, cwd=ROOT, env=full_optimisation_env(),
                       capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (workdir / "samples_latest.png").exists()
  # The recognizer was trained once into the data dir, where later runs find it.
  assert os.listdir(os.path.join(data_dir, "recognizers"))
  results = json.loads((workdir / "results.json").read_text())["metrics"]
  chance = 1 / 64
  assert results["quality/recognizer_real_accuracy"] > 0.5, results
  assert results["quality/colour_accuracy"] > 0.5, results
  assert results["quality/conditional_accuracy"] > 4 * chance, results
