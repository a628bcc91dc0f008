"""Checks of a config against the pp ops, files and models it names, run
before anything compiles (`check`, from the command line and from every
Task's constructor): image sizes that the model's patch must divide, and runs,
weights or tokenizers to start from that must exist.
"""
from __future__ import annotations

import inspect
import os

from multimodal.config import config_lib
from multimodal.config.config_lib import (ConfigError, get_dotted, has_dotted, is_node,
                                          resolve_config_path, walk)
from multimodal.data import preprocess
from multimodal.models import variants


# config.task -> the `config.evals.*.type`s its class's EVALUATORS table
# builds, named here (not imported from the classes) so that checking a
# config needs no JAX; tests/test_tasks_table.py keeps the two equal.
EVALUATOR_TYPES = {
    "classify": ("classification",),
    "clip": ("zero_shot", "retrieval"),
    "dit": ("samples", "denoising_loss", "quality"),
    "vlm": ("vqa", "captioning"),
}


def check(config) -> None:
  """Checks what can be checked before anything compiles.

  Every preprocessing string (a key named `pp` anywhere in the config) is
  parsed now, so an unknown op or a bad argument fails in a second, not after
  minutes of compilation the way it does in big_vision. So do image sizes
  that the model's patch does not divide (check_image_patch) and runs or
  weights to start from that do not exist (check_init_paths).
  """
  config_lib.validate(config)
  check_evaluators(config)
  for path, value in walk(config):
    if path.rsplit(".", 1)[-1] == "pp" and value is not None:
      try:
        preprocess.parse(value)
      except preprocess.PreprocessError as e:
        raise ConfigError(f"config.{path}: {e}") from None
  check_image_patch(config)
  check_init_paths(config)


# -- Image size against patch size -------------------------------------------------


def variant_patch(variant) -> tuple[int, int] | None:
  """The patch a ViT/DiT variant string names: "mu/8" -> (8, 8), "B/16x8" ->
  (16, 8); None when it names none ("S")."""
  parsed = variants.parse(variant)
  return parsed[1] if parsed else None


def tower_patch(tower, key: str) -> tuple[str, tuple[int, int]] | None:
  """(what names it, patch) of a model config with `variant` / `patch_size`;
  None when the patch is the model's default (not in the config)."""
  if tower is None:
    return None
  patch = variant_patch(tower.get("variant"))
  if patch is not None:
    return f"{key}.variant={tower.variant!r}", patch
  size = tower.get("patch_size")
  if size is not None:
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return f"{key}.patch_size={size}", (int(size[0]), int(size[1]))
  return None


# Ops that set the image to a fixed size, that keep its size, and (any other
# op acting on the image) that leave it unknown, e.g. resize_small.
_SIZE_SETTING_OPS = ("resize", "central_crop", "random_crop")
_SIZE_KEEPING_OPS = ("value_range", "normalize", "flip_lr")


def pp_image_size(spec: str, key: str = "image") -> tuple[int, int] | None:
  """The (h, w) of example[key] after the preprocessing `spec`, when an op
  fixes it (resize(64), central_crop((32, 48))); None if unknown or unparsable."""
  try:
    calls = preprocess.parse(spec)
  except preprocess.PreprocessError:
    return None
  size = None
  for call in calls:
    factory = preprocess.OPS[call.name]
    try:
      bound = inspect.signature(factory).bind_partial(*call.args, **call.kwargs)
    except TypeError:
      return None
    bound.apply_defaults()
    if bound.arguments.get("key") != key or call.name in _SIZE_KEEPING_OPS:
      continue
    value = bound.arguments.get("size") if call.name in _SIZE_SETTING_OPS else None
    if isinstance(value, int) and not isinstance(value, bool):
      size = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
      size = (int(value[0]), int(value[1]))
    else:
      size = None
  return size


def image_pp_keys(config, eval_types=None) -> list[str]:
  """Dotted keys of the pp strings whose images reach the model: input.pp
  and evals.*.pp (of `eval_types` only, if given)."""
  keys = ["input.pp"] if config.get("input", {}).get("pp") else []
  for name, evaluator in sorted((config.get("evals") or {}).items()):
    if not is_node(evaluator) or not evaluator.get("pp"):
      continue
    if eval_types is None or evaluator.get("type") in eval_types:
      keys.append(f"evals.{name}.pp")
  return keys


def check_image_sizes(config, *, patch, patch_key: str, pp_keys, image_size=None,
                      image_size_key: str = "config.input.image_size",
                      same_size: bool = False) -> None:
  """Every image size of the config (image_size, and each pp's final size)
  is a multiple of the patch; with `same_size`, each pp's size also equals
  image_size (learned position embeddings are built for that size)."""
  ph, pw = patch
  if image_size is not None:
    size = _pair(image_size)
    if size[0] % ph or size[1] % pw:
      raise ConfigError(
          f"{image_size_key}={image_size} is not divisible by the {ph}x{pw} patch of "
          f"{patch_key}: {_fix(size, patch)}.")
  for key in pp_keys:
    size = pp_image_size(get_dotted(config, key))
    if size is None:
      continue
    if size[0] % ph or size[1] % pw:
      raise ConfigError(
          f"config.{key} makes {size[0]}x{size[1]} images, not divisible by the "
          f"{ph}x{pw} patch of {patch_key}: in its resize/crop, "
          f"{_fix(size, patch)}.")
    if same_size and image_size is not None and size != _pair(image_size):
      raise ConfigError(
          f"config.{key} makes {size[0]}x{size[1]} images, but the model is built "
          f"for {image_size_key}={image_size} (learned position embeddings): make "
          "them the same size.")


def _pair(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _fix(size, patch) -> str:
  """`use 56 or 64, or a patch that divides 60` for size 60 and patch 8."""
  sizes = []
  for n, p in zip(size, patch):
    below, above = n // p * p, (n // p + 1) * p
    sizes.append(f"{below} or {above}" if below else f"{above}")
  what = sizes[0] if size[0] == size[1] and patch[0] == patch[1] else (
      f"heights {sizes[0]} and widths {sizes[1]}")
  return f"use {what}, or a patch that divides {size[0] if size[0] == size[1] else size}"


def check_image_patch(config) -> None:
  """config.input.image_size and the sizes its pp strings make, against the
  patch of the model that reads them (ViT towers of clip/classify runs; a
  pixel-space DiT). A VLM's vision tower and a latent DiT are checked by
  their tasks, which know the vision run and the VAE."""
  task = config.get("task")
  model = config.get("model")
  if not is_node(model):
    return
  if task in ("clip", "classify"):
    tower, key = model.get("image"), "model.image"
    eval_types = None
    same_size = (tower or {}).get("posemb", "learn") == "learn"
  elif task == "dit":
    if (config.get("vae") or {}).get("from_diffusers"):
      return  # Latents: DiffusionTask checks them once it has read the VAE.
    tower, key, eval_types, same_size = model, "model", ("denoising_loss",), False
  else:
    return
  found = tower_patch(tower, key)
  if found is None:
    return
  patch_key, patch = found
  check_image_sizes(config, patch=patch, patch_key=f"config.{patch_key}",
                    pp_keys=image_pp_keys(config, eval_types),
                    image_size=config.get("input", {}).get("image_size"),
                    same_size=same_size)


# -- Runs and weights to start from ------------------------------------------------

def check_init_paths(config) -> None:
  """Every run, weights directory or file the config names to start from
  exists, before anything compiles: keys `workdir` / `*_workdir` (a run of
  this codebase: config.json and a checkpoint), `from_*` (a local Hugging
  Face / diffusers model directory), `tokenizer.model` (a SentencePiece
  file) and the config specs beside them (`config`, `recognizer`: trained on
  first use, so only their file must exist). Unset (None) keys are skipped."""
  for path, value in walk(config):
    if not isinstance(value, str) or not value:
      continue
    parent, _, leaf = path.rpartition(".")
    key = f"config.{path}"
    if leaf == "workdir" or leaf.endswith("_workdir"):
      spec_key = f"{parent}.{'config' if leaf == 'workdir' else leaf[:-len('_workdir')]}"
      spec_key = spec_key.lstrip(".")
      _check_run_dir(key, value, spec_key if has_dotted(config, spec_key) else None)
    elif leaf.startswith("from_"):
      if not os.path.isdir(value):
        raise ConfigError(
            f"{key}={value!r}: no such directory. Point it at a local model "
            "directory (config.json and its .safetensors weights, as save_pretrained "
            "writes them), or set it to None.")
    elif path.endswith("tokenizer.model"):
      if not os.path.isfile(value):
        raise ConfigError(
            f"{key}={value!r}: no such SentencePiece model file. Fix the path, or "
            "set it to None to train a tokenizer on the training text.")
    elif leaf in ("config", "recognizer") and value.partition(":")[0].endswith(".py"):
      file = value.partition(":")[0]
      if not os.path.isfile(resolve_config_path(file)):
        raise ConfigError(
            f"{key}={value!r}: no such config file {file!r} (the run it names is "
            "trained from it on first use).")


def _check_run_dir(key: str, workdir: str, spec_key: str | None) -> None:
  fix = ("Point it at the workdir of a run of this codebase"
         + (f", or set it to None to train one from config.{spec_key} on first use"
            if spec_key else "") + ".")
  if not os.path.isdir(workdir):
    raise ConfigError(f"{key}={workdir!r}: no such directory. {fix}")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise ConfigError(f"{key}={workdir!r} is not the workdir of a run: it has no "
                      f"config.json. {fix}")
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [d for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if d.isdigit()]
  if not steps:
    raise ConfigError(f"{key}={workdir!r} has no checkpoint to start from "
                      f"(no checkpoints/<step> in it): let that run save one first. {fix}")


def check_evaluators(config) -> None:
  """config.task is a task, and each config.evals entry a type it builds."""
  task = config.get("task")
  if task not in EVALUATOR_TYPES:
    raise config_lib.ConfigError(
        f"unknown config.task {task!r}; known tasks: {', '.join(sorted(EVALUATOR_TYPES))} "
        "(e.g. --config.task=clip).")
  known = EVALUATOR_TYPES[task]
  for name, cfg in sorted((config.get("evals") or {}).items()):
    kind = cfg.get("type") if is_node(cfg) else None
    if kind not in known:
      raise config_lib.ConfigError(
          f"config.evals.{name}.type={kind!r}: a '{task}' run knows "
          f"{', '.join(map(repr, known))}; fix the type or remove the entry.")
