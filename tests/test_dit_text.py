"""Text-conditioned DiT: the frozen text tower of a CLIP run of this codebase
conditions the denoiser (pooled into adaLN, optionally cross-attended), stays
fixed through training, and any prompt can be sampled."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TINY_WORLD
from multimodal.config import config_lib
from multimodal.tasks import dit as dit_task, text_encoder
from multimodal.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_dit_config(data_dir, clip_workdir, cross_attention=False):
  from configs import dit_shapes
  config = dit_shapes.get_config(
      f"variant=mu/8,steps=12,res=32,batch=16,cond=text,cross_attention={cross_attention}")
  config.input.data_dir = data_dir
  config.input.shapes_world = dict(TINY_WORLD)
  config.input.shuffle_buffer = 100
  config.model.text_encoder.workdir = clip_workdir
  config.schedule.warmup_steps = 2
  config.log_steps = 4
  config.ckpt_steps = 12
  config.evals.samples.steps = 2
  config.evals.samples.num = 8
  for name in ("val_loss", "quality"):
    del config.evals[name]
  return config


@pytest.mark.integration
def test_text_tower_is_loaded_frozen_and_conditions_the_dit(data_dir, clip_workdir, tmp_path):
  config = text_dit_config(data_dir, clip_workdir)
  task = dit_task.DiffusionTask(config)
  assert task.model.text_dim == 128 and task.model.num_classes is None
  clip_txt = text_encoder.FrozenTextEncoder.of_run(clip_workdir).weights()
  workdir = tmp_path / "dit_text"
  trainer.train(task, config, str(workdir))
  state = trainer.restore_latest(task, config, str(workdir), task_mesh(config))
  # The text tower is exactly the CLIP run's, after training; the DiT moved.
  for path, value in jax.tree_util.tree_leaves_with_path(state["params"]["text_encoder"]):
    np.testing.assert_array_equal(np.asarray(value), _at(clip_txt, path), err_msg=str(path))
  assert float(np.abs(np.asarray(state["params"]["text_embedder"]["kernel"])).sum()) > 0
  # Different prompts give different conditions, hence different samples.
  sample = task.sampler(task_mesh(config), steps=2, cfg_scale=3.0)
  params = trainer.eval_params(state)
  red = np.asarray(sample(params, task.condition_for_prompt("a red circle", 8)))
  blue = np.asarray(sample(params, task.condition_for_prompt("a blue square", 8)))
  assert red.shape == (8, 32, 32, 3) and not np.allclose(red, blue)

  # The sample CLI takes any text in text mode (no shape-and-colour rule).
  run = subprocess.run(
      [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
       "--prompt=a circle at the top", "--n=2", "--steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (workdir / "samples" / "a_circle_at_the_top.png").exists()


@pytest.mark.unit
def test_cross_attention_option_adds_per_block_text_attention(data_dir, clip_workdir):
  config = text_dit_config(data_dir, clip_workdir, cross_attention=True)
  task = dit_task.DiffusionTask(config)
  params = jax.eval_shape(task.init, jax.random.key(0))
  assert "cross_attn" in params["blocks_0"] and "text_tokens_embedder" in params
  batch = {"image": np.zeros((2, 32, 32, 3), np.float32),
           "tokens": task.condition_for_prompt("a red circle", 2)}
  rng = jax.random.key(1)
  loss, _ = jax.jit(task.loss_fn)(jax.tree.map(
      lambda x: x.value, task.init(jax.random.key(0)),
      is_leaf=lambda x: hasattr(x, "names")), task.random_draws(batch, rng), rng)
  assert np.isfinite(float(loss))


@pytest.mark.unit
def test_a_finished_run_does_not_need_its_text_encoder_run_at_hand(data_dir, trainings_asked):
  """Sampling from a finished run builds its task: the encoder's architecture
  and tokenizer come from the CLIP run's config, not from a trained run (its
  weights are in the DiT's checkpoint). Only training asks for the run."""
  config = text_dit_config(data_dir, None)
  config.model.text_encoder.config = "configs/clip_shapes.py:res=32,text_variant=mu"
  task = dit_task.DiffusionTask(config)
  assert trainings_asked == []
  want = config_lib.load_config_file(config.model.text_encoder.config)
  assert task.text_encoder.config.model.text.to_dict() == want.model.text.to_dict()
  assert task.condition_for_prompt("a red circle", 2).shape == (2, want.input.tokenizer.max_len)
  assert task.text_encoder.workdir == "/cached/clip"
  assert trainings_asked == [config.model.text_encoder.config]


@pytest.mark.unit
def test_text_conditioning_requires_the_encoder_frozen(data_dir, clip_workdir):
  config = text_dit_config(data_dir, clip_workdir)
  config.freeze = None
  with pytest.raises(config_lib.ConfigError, match="freeze"):
    dit_task.DiffusionTask(config)


def task_mesh(config):
  from multimodal.parallel import sharding
  return sharding.make_mesh(config.mesh)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)
