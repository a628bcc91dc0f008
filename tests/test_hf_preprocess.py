"""The pp spec made from an HF preprocessor_config.json, against transformers.

Processors are built in transformers with typical kwargs (nothing downloaded)
and saved with save_pretrained. Both sides read the same PNG bytes. The
reference is transformers' PIL backend, which the original CLIP
preprocessing used (and which CLIPImageProcessor falls back to without
torchvision).

PIL and TF resample differently in one way that matters: PIL's 8-bit resize
runs a horizontal then a vertical pass and rounds and clips to uint8 in
between, TF rounds once at the end. On natural images that moves pixels by
at most 1-2 uint8 levels. On uniform noise, bicubic/lanczos overshoot past
[0, 255] in the first pass, PIL clips there, and about 1% of values differ
by more (up to ~20 levels), so noise gets a looser max bound and a bound on
how many values differ by more than 2 levels.
"""
import io
import json

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from multimodal.data import preprocess as pp  # noqa: E402
from multimodal.importers.hf_preprocess import image_pp_from_hf  # noqa: E402
from multimodal.importers.safetensors_io import WeightImportError  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SPEC = ('decode|resize_small(224, method="bicubic")|central_crop(224)|value_range(0, 1)|'
             f'normalize(mean={CLIP_MEAN}, std={CLIP_STD})')
SIGLIP_SPEC = 'decode|resize(224, method="bicubic")|value_range(0, 1)|normalize(mean=0.5, std=0.5)'


def saved(processor, path) -> str:
  processor.save_pretrained(str(path))
  return str(path)


def noise(h, w, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def smooth(h, w, seed=0) -> np.ndarray:
  """A photo-like image: coarse noise upsampled (structure, no pixel noise)."""
  return np.asarray(Image.fromarray(noise(h // 8, w // 8, seed)).resize((w, h), Image.BICUBIC))


def png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def both(processor, spec: str, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ours, HF's) on the same PNG, both [H, W, C]."""
  data = png(img)
  theirs = processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
  ours = pp.build(spec)({"image": tf.constant(data)})["image"].numpy()
  assert theirs.shape[0] == 1
  theirs = theirs[0].transpose(1, 2, 0)
  assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
  return ours, theirs


def levels(diff: np.ndarray, std) -> np.ndarray:
  """A difference of normalised values in uint8 levels (x 255 x std)."""
  return diff * np.float32(std) * 255


# Measured with these images (transformers 5.23, Pillow 13, TF 2.21), in
# normalised units: CLIP mean |diff| 0.002-0.004, max 1-2 levels (0.028) on
# smooth images and 0.31 (21 levels) on noise; SigLIP mean 0.001-0.002, max
# 1 level (0.008) on smooth images and 0.16 on noise. On noise <= 0.8% of
# values are off by more than 2 levels.
CASES = [("noise", 97, 143), ("noise", 300, 200), ("smooth", 97, 143),
         ("smooth", 300, 200), ("smooth", 480, 640)]


def check_close(ours, theirs, std, kind):
  diff = np.abs(ours - theirs)
  off = levels(diff, std)
  assert diff.mean() < 0.008, diff.mean()
  if kind == "smooth":
    assert off.max() < 2.01, off.max()
  else:
    assert diff.max() < 0.4, diff.max()
    assert (off > 2.01).mean() < 0.01, (off > 2.01).mean()


# (processor class, the spec we derive from its defaults, its std for check_close).
DEFAULTS = {"clip": ("CLIPImageProcessorPil", CLIP_SPEC, CLIP_STD),
            "siglip": ("SiglipImageProcessorPil", SIGLIP_SPEC, 0.5)}


@pytest.mark.parametrize("family", sorted(DEFAULTS))
@pytest.mark.parametrize("kind, h, w", CASES)
def test_default_processors_match_transformers(tmp_path, family, kind, h, w):
  processor_class, want_spec, std = DEFAULTS[family]
  processor = getattr(transformers, processor_class)()
  spec = image_pp_from_hf(saved(processor, tmp_path))
  assert spec == want_spec
  img = (noise if kind == "noise" else smooth)(h, w)
  ours, theirs = both(processor, spec, img)
  assert ours.shape == (224, 224, 3)
  check_close(ours, theirs, std, kind)


@pytest.mark.parametrize("hw", [(97, 143), (143, 97), (300, 200), (1000, 231), (231, 1000),
                                (64, 64), (224, 500)])
def test_resize_small_output_size_matches_transformers(tmp_path, hw):
  # 1000 x 231 -> 969.7 x 224: HF truncates, so must we.
  processor = transformers.CLIPImageProcessorPil(do_center_crop=False)
  spec = image_pp_from_hf(saved(processor, tmp_path))
  assert "central_crop" not in spec
  ours, theirs = both(processor, spec, smooth(*hw))
  if 224 in hw:  # Already the right size: both leave the pixels alone.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_crop_rescale_normalize_are_exact(tmp_path):
  # Without resizing nothing is resampled: the crop window (odd margins) and
  # the arithmetic agree to float32 rounding.
  processor = transformers.CLIPImageProcessorPil(
      do_resize=False, crop_size={"height": 62, "width": 90})
  spec = image_pp_from_hf(saved(processor, tmp_path / "clip"))
  assert "central_crop((62, 90))" in spec and "resize" not in spec
  ours, theirs = both(processor, spec, noise(97, 143))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
  # A rescale factor other than 1/255, without normalisation.
  processor = transformers.SiglipImageProcessorPil(
      do_resize=False, rescale_factor=1 / 127.5, do_normalize=False)
  spec = image_pp_from_hf(saved(processor, tmp_path / "siglip"))
  assert spec == "decode|value_range(0, 2.0)"
  ours, theirs = both(processor, spec, noise(30, 20))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resample, method, max_levels", [
    (2, "bilinear", 1.01),   # PIL's triangle filter = TF's antialiased bilinear.
    (1, "lanczos3", 2.01),
    (0, "nearest", 0.0),     # Exact when enlarging. (When shrinking, at an exact
                             # tie PIL may take the previous source pixel.)
])
def test_other_resample_filters(tmp_path, resample, method, max_levels):
  processor = transformers.CLIPImageProcessorPil(resample=resample)
  spec = image_pp_from_hf(saved(processor, tmp_path))
  assert f'resize_small(224, method="{method}")' in spec
  img = noise(97, 143) if resample != 1 else smooth(300, 200)
  ours, theirs = both(processor, spec, img)
  assert levels(np.abs(ours - theirs), CLIP_STD).max() <= max_levels + 1e-3


def test_old_feature_extractor_config(tmp_path):
  # openai/clip-vit-base-patch32's file: int sizes, no rescale fields.
  cfg = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
         "image_std": list(CLIP_STD), "resample": 3, "size": 224}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
  assert image_pp_from_hf(str(tmp_path)) == CLIP_SPEC
  processor = transformers.CLIPImageProcessorPil.from_pretrained(str(tmp_path))
  ours, theirs = both(processor, CLIP_SPEC, smooth(300, 200))
  check_close(ours, theirs, CLIP_STD, "smooth")


def test_missing_file_says_what_is_needed(tmp_path):
  with pytest.raises(WeightImportError) as info:
    image_pp_from_hf(str(tmp_path))
  msg = str(info.value)
  assert "preprocessor_config.json does not exist" in msg and str(tmp_path) in msg
  assert "CLIPImageProcessor" in msg and "save_pretrained" in msg


R = transformers.image_utils.PILImageResampling


@pytest.mark.parametrize("make, field", [
    (lambda: transformers.CLIPImageProcessorPil(resample=R.BOX), "resample=4"),
    (lambda: transformers.CLIPImageProcessorPil(do_pad=True), "do_pad=True"),
    (lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 200, "longest_edge": 300}),
     "size="),
    (lambda: transformers.CLIPImageProcessorPil(crop_size=256), "crop_size="),
    (lambda: transformers.SiglipImageProcessorPil(image_std=[0.5, 0.0, 0.5]), "image_std="),
    (lambda: transformers.SiglipImageProcessorPil(image_mean=[0.5, 0.5]), "image_mean="),
    (lambda: transformers.Siglip2ImageProcessorPil(), "image_processor_type='Siglip2ImageProcessor'"),
])
def test_unsupported_values_name_the_field(tmp_path, make, field):
  with pytest.raises(WeightImportError) as info:
    image_pp_from_hf(saved(make(), tmp_path))
  msg = str(info.value)
  assert f"preprocessor_config.json field {field}" in msg and "not supported" in msg, msg


def test_bad_json(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text("{not json")
  with pytest.raises(WeightImportError, match="not valid JSON"):
    image_pp_from_hf(str(tmp_path))
