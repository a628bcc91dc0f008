"""A tiny CLIP trains for 1800 steps (4 minutes) through the real command line
and comes out far above chance at zero-shot shape and colour classification
and at retrieval; `eval` re-runs the evaluators on its checkpoint.
"""
import json
import os
import subprocess
import sys

import pytest

# Full-size 64 px images (shape is not learnable from the 32 px tiny world's
# 6 px objects in a test's budget), but few of them.
E2E_WORLD = dict(image_size=64, train_examples=4_000, eval_examples=300, seed=0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_clip_learns_shapes_zero_shot(data_dir, tmp_path):
  workdir = tmp_path / "run"
  world = ",".join(f"--config.input.shapes_world.{k}={v}" for k, v in E2E_WORLD.items())
  args = [sys.executable, "-m", "experiments.train",
          "configs/clip_shapes.py:variant=mu/8,text_variant=mu,steps=1800,res=64,batch=64",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          "--config.input.tokenizer.vocab_size=128", "--config.ckpt_steps=600",
          *world.split(",")]
  run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "zero_shot_shape" in run.stdout  # The printed results table.
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert (workdir / name).exists(), name
  assert (workdir / "checkpoints" / "1800").is_dir()
  assert any((workdir / "tensorboard").iterdir())
  results = json.loads((workdir / "results.json").read_text())["metrics"]
  chance = 1 / 8
  assert results["zero_shot_shape/acc1"] > 3 * chance, results
  assert results["zero_shot_colour/acc1"] > 3 * chance, results
  assert results["zero_shot_colour_novel/acc1"] > 3 * chance, results
  # Chance recall@10 is 10/300 from text to image.
  assert results["retrieval/text_to_image_recall@10"] > 0.3, results

  evaluation = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  again = json.loads((workdir / "eval_results.json").read_text())["metrics"]
  for key in ("zero_shot_colour/acc1", "retrieval/text_to_image_recall@10"):
    assert again[key] == pytest.approx(results[key], abs=1e-6)
