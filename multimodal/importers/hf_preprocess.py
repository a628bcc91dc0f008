"""A pp spec equivalent to a Hugging Face CLIP/SigLIP `preprocessor_config.json`.

An imported model only works on images preprocessed the way it was trained,
and HF records that in the model directory's ``preprocessor_config.json``.
`image_pp_from_hf(directory)` turns it into a spec for
multimodal.data.preprocess, applying HF's steps in HF's order:

  do_resize, size={"shortest_edge": N}  -> resize_small(N, method=...)
  do_resize, size={"height": H, "width": W} -> resize((H, W), method=...)
      (an int size means shortest_edge, a [H, W] list means height/width;
      resample is a PIL code: 0 nearest, 1 lanczos -> lanczos3, 2 bilinear,
      3 bicubic, always antialiased like PIL)
  do_center_crop, crop_size            -> central_crop((H, W))
      (HF zero-pads an image smaller than the crop, central_crop fails: a
      crop larger than the resized shorter side is rejected here)
  do_rescale, rescale_factor f         -> value_range(0, 255 * f), i.e. x * f
  do_normalize, image_mean, image_std  -> normalize(mean=..., std=...)

Missing (or null) fields take the processor class's defaults, as in HF.
`decode` always yields RGB (do_convert_rgb); unlike HF it drops an alpha
channel instead of compositing it onto white. Cropping, rescaling and
normalising are exact up to float32 rounding. Resizing is not bit-exact
against HF's PIL backend: PIL rounds to uint8 between its horizontal and
vertical passes, so bilinear pixels differ by at most 1 uint8 level and
bicubic/lanczos by 1-2 on natural images (more on pixel noise, where PIL
clips the first pass's overshoot); nearest is exact except at exact ties when
shrinking. tests/test_hf_preprocess.py measures this. (The torchvision
"Fast" backend reads the same fields but resamples with torch, so it differs
from both.) Configs this mapping cannot reproduce raise WeightImportError
naming the field.
"""
from __future__ import annotations

import math
import os

from multimodal.importers.safetensors_io import WeightImportError, read_json_object

CONFIG_NAME = "preprocessor_config.json"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_COMMON = {"do_resize": True, "resample": 3, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}
# The class defaults of transformers' CLIPImageProcessor / SiglipImageProcessor.
_DEFAULTS = {
    "CLIP": {**_COMMON, "size": {"shortest_edge": 224}, "do_center_crop": True,
             "crop_size": {"height": 224, "width": 224},
             "image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD},
    "Siglip": {**_COMMON, "size": {"height": 224, "width": 224},
               "do_center_crop": False, "crop_size": None,
               "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}
# Processor class -> family; "Fast" (torchvision) and "Pil" are backends of
# the same processor, and old configs (openai/clip-vit-*) name a FeatureExtractor.
_CLASSES = {f"{family}ImageProcessor{backend}": family
            for family in _DEFAULTS for backend in ("", "Fast", "Pil")}
_CLASSES["CLIPFeatureExtractor"] = "CLIP"
_METHODS = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic"}
_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def _error(field: str, value, want: str) -> WeightImportError:
  return WeightImportError(
      f"{CONFIG_NAME} field {field}={value!r} is not supported: the spec "
      f"needs {field} {want}.")


def _is_size(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _hw(field: str, value, want: str) -> tuple[int, int]:
  """An int (square), [height, width] or {"height", "width"} as (height, width)."""
  if _is_size(value):
    return value, value
  if isinstance(value, list) and len(value) == 2 and all(map(_is_size, value)):
    return tuple(value)
  if isinstance(value, dict) and set(value) == {"height", "width"} and all(
      map(_is_size, value.values())):
    return value["height"], value["width"]
  raise _error(field, value, want)


def _floats(field: str, value) -> tuple[float, ...]:
  values = value if isinstance(value, (list, tuple)) else [value]
  if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in values):
    raise _error(field, value, "to be a number or a list of numbers")
  if len(values) not in (1, 3):  # decode always gives RGB.
    raise _error(field, value, "to have 1 or 3 (RGB) values")
  return tuple(float(v) for v in values)


def _fmt(values: tuple[float, ...]) -> str:
  """A scalar when all channels agree (0.5, not (0.5, 0.5, 0.5))."""
  return repr(values[0]) if len(set(values)) == 1 else repr(values)


def _size_str(h: int, w: int) -> str:
  return str(h) if h == w else f"({h}, {w})"


def spec_from_config(cfg: dict) -> str:
  """The spec for a parsed preprocessor_config.json (see the module docstring)."""
  cls = cfg.get("image_processor_type", cfg.get("feature_extractor_type"))
  if cls not in _CLASSES:
    raise _error("image_processor_type", cls, f"to be one of {sorted(_CLASSES)}")
  cfg = {**_DEFAULTS[_CLASSES[cls]],
         **{k: v for k, v in cfg.items() if v is not None}}
  for field, value in cfg.items():  # E.g. do_pad: a step we do not map.
    if field.startswith("do_") and field not in _STEPS and value:
      raise _error(field, value, "to be false (no pp op does that step)")
  ops = ["decode"]
  short = None  # The shorter side after resizing, if it is known.
  if cfg["do_resize"]:
    resample = cfg["resample"]
    if type(resample) is not int or resample not in _METHODS:
      raise _error("resample", resample, f"to be a PIL resampling code in {_METHODS}")
    method = f'method="{_METHODS[resample]}"'
    size = cfg["size"]
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
      size = size["shortest_edge"]
    if _is_size(size):
      ops.append(f"resize_small({size}, {method})")
      short = size
    else:
      h, w = _hw("size", size, 'to be an int, [height, width], {"shortest_edge"} '
                 'or {"height", "width"}')
      ops.append(f"resize({_size_str(h, w)}, {method})")
      short = min(h, w)
  if cfg["do_center_crop"]:
    h, w = _hw("crop_size", cfg["crop_size"],
               'to be an int, [height, width] or {"height", "width"}')
    if short is not None and max(h, w) > short:
      # HF zero-pads where the image is smaller than the crop.
      raise _error("crop_size", cfg["crop_size"],
                   f"to fit inside the resized image (shorter side {short})")
    ops.append(f"central_crop({_size_str(h, w)})")
  if cfg["do_rescale"]:
    f = cfg["rescale_factor"]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
      raise _error("rescale_factor", f, "to be a positive number")
    vmax = 1 if math.isclose(255 * f, 1, rel_tol=1e-6) else 255 * f
    ops.append(f"value_range(0, {vmax!r})")
  if cfg["do_normalize"]:
    mean = _floats("image_mean", cfg["image_mean"])
    std = _floats("image_std", cfg["image_std"])
    if 0 in std:
      raise _error("image_std", cfg["image_std"], "to be non-zero")
    ops.append(f"normalize(mean={_fmt(mean)}, std={_fmt(std)})")
  return "|".join(ops)


def image_pp_from_hf(directory: str) -> str:
  """The pp spec that preprocesses images like `directory`'s HF image processor."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise WeightImportError(
        f"{path} does not exist. An HF CLIP/SigLIP model directory needs the "
        f"{CONFIG_NAME} its image processor saved (CLIPImageProcessor or "
        "SiglipImageProcessor: size, resample, crop_size, rescale_factor, "
        "image_mean, image_std, ...); download it with the model, or write it "
        "with processor.save_pretrained(directory).")
  return spec_from_config(read_json_object(path))
