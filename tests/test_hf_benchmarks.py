"""`eval --hf` and `embed --hf` on local Hugging Face CLIP and SigLIP
directories (model, tokenizer and image processor written by transformers,
random weights): our JAX path from image files and strings to embeddings
agrees with transformers' own processor + model."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from hf_models import CONFIGS, make_hf, torch, train_bpe, transformers
from multimodal.eval_suite import encoders, index

CLASSES = {"red_square": (200, 30, 30), "blue_circle": (30, 40, 210), "green_thing": (40, 190, 60)}
TEXTS = ["a red square", "the blue circle on the left", "a green square of the right"]


def picture(colour, i):
  """A 40 x 52 picture (CLIP's processor resizes then crops it) with a gradient."""
  y, x = np.mgrid[0:40, 0:52]
  image = np.asarray(colour, np.float32) * (0.6 + 0.4 * x[..., None] / 52)
  image[(y - 20 - i) ** 2 + (x - 26) ** 2 < 64 + 8 * i] *= 0.5
  return image.astype(np.uint8)


def clip_dir(path):
  """CLIP (quick_gelu) + its CLIPTokenizer + CLIPImageProcessor (shortest edge
  and centre crop), as save_pretrained writes them."""
  bpe = json.loads(train_bpe(["<|startoftext|>", "<|endoftext|>"], True).to_str())
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in bpe["model"]["merges"]]
  tokenizer = transformers.CLIPTokenizer(vocab=bpe["model"]["vocab"], merges=merges)
  tokenizer.save_pretrained(str(path))
  _, cfg = CONFIGS["clip_quick_gelu"]
  # The model's special ids are the tokenizer's: bos 0, eos = pad 1.
  text = dict(cfg["text_config"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
  model = make_hf("clip_quick_gelu", text_config=text)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32)
  return model, tokenizer, processor


def siglip_dir(path):
  """SigLIP (MAP head) + a tokenizer laid out as SigLIP's ("$A </s>", pad =
  eos) + SiglipImageProcessor (a fixed 32 x 32 resize, no crop)."""
  from tokenizers import processors
  tok = train_bpe(["<pad>", "</s>", "<unk>"], False)  # eos = pad = 1, as in CONFIGS.
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>",
       "unk_token": "<unk>"}))
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", 1)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
  processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
  return make_hf("siglip_map"), tokenizer, processor


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_dir(request, tmp_path_factory):
  """(directory, model, tokenizer, processor) of a saved HF model."""
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model, tokenizer, processor = {"clip": clip_dir, "siglip": siglip_dir}[request.param](path)
  model.save_pretrained(str(path))
  processor.save_pretrained(str(path))
  return path, model, tokenizer, processor


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("pictures")
  for name, colour in CLASSES.items():
    (root / name).mkdir()
    for i in range(4):
      Image.fromarray(picture(colour, i)).save(root / name / f"{i}.png")
  return root


def hf_image_embeddings(model, processor, paths):
  pixels = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    z = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def hf_text_embeddings(model, tokenizer, texts):
  """As each family's processor pads: CLIP with an attention mask, SigLIP
  to max_length without one (see test_hf_import)."""
  ids = tokenizer(texts, padding="max_length", truncation=True, max_length=16,
                  return_tensors="pt")
  if isinstance(model, transformers.SiglipModel):
    ids = {"input_ids": ids["input_ids"]}
  with torch.no_grad():
    z = model.get_text_features(**ids).pooler_output.numpy()
  return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.unit
def test_embeddings_match_transformers(hf_dir, image_folder):
  path, model, tokenizer, processor = hf_dir
  encoder = encoders.from_hf(str(path))
  paths = index.image_files(str(image_folder))
  ours, _ = index.embed_images(encoder, paths, batch_size=8)
  theirs = hf_image_embeddings(model, processor, paths)
  # PIL's and TF's bicubic resize differ by a level or two of uint8 (see
  # test_hf_preprocess); the embeddings stay within that.
  cosines = np.sum(ours * theirs, axis=1)
  assert cosines.min() > 0.999, cosines
  np.testing.assert_allclose(encoder.embed_texts(TEXTS),
                             hf_text_embeddings(model, tokenizer, TEXTS), atol=1e-5)


@pytest.mark.integration
def test_eval_hf_on_a_folder(hf_dir, image_folder, tmp_path):
  """The command line, and its zero-shot accuracy against the one computed
  from transformers' embeddings with the same prompts."""
  path, model, tokenizer, processor = hf_dir
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--hf={path}",
       f"--benchmarks=folder:{image_folder}", "--templates=simple", f"--out={out}",
       f"--cache_dir={tmp_path / 'cache'}", "--batch_size=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  (record_path,) = out.glob("*.json")
  record = json.loads(record_path.read_text())
  assert record["model"] == f"{model.config.model_type}-{path.name}"
  assert record["pretrained"] == f"hf:{path}"
  paths = index.image_files(str(image_folder))
  labels = np.repeat(np.arange(len(CLASSES)), 4)  # Sorted class folders, 4 each.
  names = sorted(n.replace("_", " ") for n in CLASSES)
  classifier = hf_text_embeddings(model, tokenizer, [f"a photo of a {n}." for n in names])
  logits = hf_image_embeddings(model, processor, paths) @ classifier.T
  assert record["metrics"]["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))


@pytest.mark.integration
def test_eval_hf_errors(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--hf={tmp_path}",
                        "--benchmarks=folder:/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "config.json" in last, run.stderr
  assert "Traceback" not in run.stderr
