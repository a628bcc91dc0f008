"""`./launch.sh ask --workdir DIR --image PATH "what colour is the square?"`
`./launch.sh caption --workdir DIR --image PATH`

A vision-language run answers a question about (or captions) an image, or
every image of a folder (--image FOLDER), one line per image.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from experiments import flags_cli
from experiments.common import fail, user_errors

WORKDIR = flags.DEFINE_string("workdir", None, "A run of configs/vlm_shapes.py.")
IMAGE = flags.DEFINE_string("image", None, "An image file, or a folder of images.")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0,
                                      "Answer length limit (0: the run's own).")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampled.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature).")


def main(argv: list[str], *, caption: bool) -> None:
  rest = flags_cli.parse(argv, __doc__)
  if not WORKDIR.value or not IMAGE.value:
    fail("give --workdir DIR (a VLM run) and --image PATH (a file or a folder).")
  if caption and rest:
    fail(f"caption takes no question; got {' '.join(rest)!r}.")
  if not caption and len(rest) != 1:
    fail('give one question, e.g. ./launch.sh ask --workdir DIR --image img.png '
         '"what colour is the square?"')
  try:
    answers = answer_images(WORKDIR.value, IMAGE.value, None if caption else rest[0])
  except user_errors() as e:
    fail(str(e))
  for path, answer in answers:
    print(f"{path}: {answer}")


def answer_images(workdir: str, image: str, question: str | None) -> list[tuple[str, str]]:
  import jax
  import numpy as np
  import tensorflow as tf

  from multimodal import tasks
  from multimodal.config import config_lib
  from multimodal.data import errors, preprocess
  from multimodal.eval_suite import encoders, index
  from multimodal.tasks import trained_runs
  config = config_lib.load_workdir_config(workdir)
  if config.task != "vlm" or config.stage == "lm":
    what = f"stage '{config.stage}'" if config.task == "vlm" else f"'{config.task}'"
    raise config_lib.ConfigError(
        f"{workdir} is a {what} run; ask and caption need a VLM run that sees "
        "images (configs/vlm_shapes.py, stage align or tune).")
  task = tasks.get(config.task)(config)
  params = trained_runs.eval_params(workdir, type(task))
  paths = index.image_files(image) if os.path.isdir(image) else [image]
  if not os.path.isfile(paths[0]):
    raise errors.DataError(f"--image {image} does not exist.")
  pp = preprocess.build(encoders.test_time_image_pp(config.input.pp))

  def load(path):
    try:
      return pp({"image": tf.io.read_file(path)})["image"].numpy()
    except tf.errors.OpError:
      raise errors.DataError(f"{path} is not a readable image: give JPEG, PNG, GIF "
                             "or BMP files.") from None
  images = np.stack([load(p) for p in paths])
  prompt = question or config.evals.captioning.get("prompt", "caption")
  limit = MAX_NEW_TOKENS.value or (config.evals.captioning.max_new_tokens if question is None
                                   else config.evals.get("vqa_test", {}).get("max_new_tokens", 8))
  generate = task.generate_fn(limit, TEMPERATURE.value, TOP_P.value)
  answers = task.answer(jax.device_put(params), images, [prompt] * len(paths),
                        max_new_tokens=limit, generate=generate)
  return list(zip(paths, answers))


if __name__ == "__main__":
  main(sys.argv, caption=False)
