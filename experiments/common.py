"""What the programs behind launch.sh share: one way to fail, the flags that
name a model to load, and the errors that are the user's to fix."""
from __future__ import annotations

import sys

from absl import flags


def fail(message: str) -> None:
  """One clear line on stderr and exit status 2, never a traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def define_model_flags():
  """--workdir / --hf: a CLIP/SigLIP run trained here, or an imported HF model."""
  return (flags.DEFINE_string("workdir", None, "A CLIP/SigLIP run trained here."),
          flags.DEFINE_string("hf", None,
                              "A local Hugging Face CLIPModel/SiglipModel directory."))


def user_errors() -> tuple[type[Exception], ...]:
  """Errors that name a bad input and its fix: reported by `fail`."""
  from multimodal.config import config_lib
  from multimodal.data import errors, preprocess
  from multimodal.importers.safetensors_io import WeightImportError
  return (config_lib.ConfigError, errors.DataError, WeightImportError,
          preprocess.PreprocessError)
