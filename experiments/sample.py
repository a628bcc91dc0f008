"""`./launch.sh sample --workdir DIR --prompt "a red circle" [--n 16 --cfg 3.0
--steps 50 --sampler ddim]`: samples a trained DiT's EMA params into a PNG grid
and prints where it is.
"""
from __future__ import annotations

import os
import re
import sys

from absl import flags

from experiments import flags_cli
from experiments.common import fail

WORKDIR = flags.DEFINE_string("workdir", None, "A DiT run written by `./launch.sh run`.")
PROMPT = flags.DEFINE_string("prompt", None, 'What to draw, e.g. "a red circle".')
N = flags.DEFINE_integer("n", 16, "How many samples.")
CFG = flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (1: none).")
STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps (respaced).")
SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"], "The sampler.")
ETA = flags.DEFINE_float("eta", 0.0, "DDIM's eta (0: deterministic).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
OUT = flags.DEFINE_string("out", None, "PNG path (default: DIR/samples/<prompt>.png).")


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  workdir = WORKDIR.value
  from multimodal.config import config_lib
  try:
    config = config_lib.load_workdir_config(workdir)
  except config_lib.ConfigError as e:
    fail(f"{e} (sampling needs a run of configs/dit_shapes.py)")
  if not PROMPT.value:
    fail('--prompt is required, e.g. --prompt "a red circle".')
  if N.value < 1 or STEPS.value < 1:
    fail("--n and --steps must be at least 1.")
  if config.task != "dit":
    fail(f"{workdir} trained task '{config.task}'; sampling needs a DiT run (task 'dit').")

  import jax
  import numpy as np
  from multimodal import tasks
  from multimodal.evaluators import generation
  from multimodal.parallel import sharding
  from multimodal.train import checkpoint, trainer
  task = tasks.get(config.task)(config)
  # Pad the batch to the data-parallel size; the extra samples are dropped.
  mesh = sharding.make_mesh(config.mesh)
  devices = sharding.data_parallel_size(mesh)
  padded = -(-N.value // devices) * devices
  try:
    condition = task.condition_for_prompt(PROMPT.value, padded)
  except ValueError as e:
    fail(str(e))
  try:
    state = trainer.restore_latest(task, config, workdir, mesh)
  except checkpoint.CheckpointError as e:
    fail(str(e))
  sample = task.sampler(mesh, steps=STEPS.value, cfg_scale=CFG.value,
                        sampler=SAMPLER.value, eta=ETA.value, seed=SEED.value)
  condition = jax.device_put(condition, sharding.batch_sharding(mesh))
  with sharding.mesh_context(mesh):
    images = np.asarray(sample(trainer.eval_params(state), condition))[:N.value]
  slug = re.sub(r"[^a-z0-9]+", "_", PROMPT.value.lower()).strip("_")
  out = OUT.value or os.path.join(workdir, "samples", f"{slug}.png")
  cols = min(N.value, 8)
  path = generation.save_png(generation.image_grid(images, cols), out)
  print(f"Wrote {N.value} samples of {PROMPT.value!r} (step {int(state['step'])}, "
        f"{SAMPLER.value} {STEPS.value} steps, cfg {CFG.value}) to {path}")


if __name__ == "__main__":
  main(sys.argv)
