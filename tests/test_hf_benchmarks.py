"""`eval --hf` and `embed --hf` on a local Hugging Face CLIP directory (model,
tokenizer and preprocessor written by transformers, random weights): our
JAX path from image files and strings to embeddings agrees with
transformers' own processor + model."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from hf_models import CONFIGS, make_hf, torch, train_bpe, transformers
from multimodal.benchmarks import encoders, index

CLASSES = {"red_square": (200, 30, 30), "blue_circle": (30, 40, 210), "green_thing": (40, 190, 60)}
TEXTS = ["a red square", "the blue circle on the left", "a green square of the right"]


def picture(colour, i):
  """A 40 x 52 picture (CLIP's processor resizes then crops it) with a gradient."""
  y, x = np.mgrid[0:40, 0:52]
  image = np.asarray(colour, np.float32) * (0.6 + 0.4 * x[..., None] / 52)
  image[(y - 20 - i) ** 2 + (x - 26) ** 2 < 64 + 8 * i] *= 0.5
  return image.astype(np.uint8)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """CLIP (quick_gelu) + its CLIPTokenizer + CLIPImageProcessor, as save_pretrained writes."""
  path = tmp_path_factory.mktemp("hf_clip")
  bpe = json.loads(train_bpe(["<|startoftext|>", "<|endoftext|>"], True).to_str())
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in bpe["model"]["merges"]]
  tokenizer = transformers.CLIPTokenizer(vocab=bpe["model"]["vocab"], merges=merges)
  tokenizer.save_pretrained(str(path))
  _, cfg = CONFIGS["clip_quick_gelu"]
  # The model's special ids are the tokenizer's: bos 0, eos = pad 1.
  text = dict(cfg["text_config"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
  model = make_hf("clip_quick_gelu", text_config=text)
  model.save_pretrained(str(path))
  transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32).save_pretrained(
      str(path))
  return path, model, tokenizer


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("pictures")
  for name, colour in CLASSES.items():
    (root / name).mkdir()
    for i in range(4):
      Image.fromarray(picture(colour, i)).save(root / name / f"{i}.png")
  return root


def hf_image_embeddings(model, paths):
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32)
  pixels = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    z = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_embeddings_match_transformers(hf_dir, image_folder):
  path, model, tokenizer = hf_dir
  encoder = encoders.from_hf(str(path))
  assert encoder.image_pp.startswith('decode|resize_small(32, method="bicubic")|central_crop(32)')
  paths = index.image_files(str(image_folder))
  ours, _ = index.embed_images(encoder, paths, batch_size=8)
  theirs = hf_image_embeddings(model, paths)
  # PIL's and TF's bicubic resize differ by a level or two of uint8 (see
  # test_hf_preprocess); the embeddings stay within that.
  cosines = np.sum(ours * theirs, axis=1)
  assert cosines.min() > 0.999, cosines
  ids = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16,
                  return_tensors="pt")
  with torch.no_grad():
    z = model.get_text_features(**ids).pooler_output.numpy()
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  np.testing.assert_allclose(encoder.embed_texts(TEXTS), z, atol=1e-5)


def test_eval_hf_on_a_folder(hf_dir, image_folder, tmp_path):
  """The command line, and its zero-shot accuracy against the one computed
  from transformers' embeddings with the same prompts."""
  path, model, tokenizer = hf_dir
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--hf={path}",
       f"--benchmarks=folder:{image_folder}", "--templates=simple", f"--out={out}",
       f"--cache_dir={tmp_path / 'cache'}", "--batch_size=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  (record_path,) = out.glob("*.json")
  record = json.loads(record_path.read_text())
  assert record["model"] == f"clip-{path.name}" and record["pretrained"] == f"hf:{path}"
  paths = index.image_files(str(image_folder))
  labels = np.repeat(np.arange(len(CLASSES)), 4)  # Sorted class folders, 4 each.
  names = sorted(n.replace("_", " ") for n in CLASSES)
  ids = tokenizer([f"a photo of a {n}." for n in names], padding="max_length",
                  truncation=True, max_length=16, return_tensors="pt")
  with torch.no_grad():
    classifier = model.get_text_features(**ids).pooler_output.numpy()
  logits = hf_image_embeddings(model, paths) @ classifier.T
  assert record["metrics"]["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))


def test_eval_hf_errors(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--hf={tmp_path}",
                        "--benchmarks=folder:/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "config.json" in last, run.stderr
  assert "Traceback" not in run.stderr
