"""The benchmark, embed and search commands on a freshly trained shapes-world
CLIP (conftest's `trained_clip`), with a folder dataset written by the test
from the world's own single-object scenes."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import E2E_WORLD, ROOT, TRAINED_CLIP_GROUP, full_optimisation_env
from multimodal.eval_suite import results

pytestmark = pytest.mark.quality


def cli(*args, timeout=900):
  run = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_optimisation_env(),
                       capture_output=True,
                       text=True, timeout=timeout)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


@pytest.fixture(scope="module")
def shapes_folder(data_dir, tmp_path_factory):
  """PATH/{train,test}/<shape>/<colour>_<i>.png from the world's single-object
  scenes (train: the first 1200 scenes; test: the whole test split)."""
  from multimodal.data import shapes_builder
  builder = shapes_builder.prepare(data_dir, **E2E_WORLD)
  objects = builder.info.features["objects"]
  shapes, colours = objects["shape"].names, objects["colour"].names
  root = tmp_path_factory.mktemp("shapes_folder")
  for split, tfds_split in (("train", "train[:1200]"), ("test", "test")):
    for i, ex in enumerate(builder.as_dataset(split=tfds_split).as_numpy_iterator()):
      if ex["num_objects"] != 1:
        continue
      shape, colour = shapes[ex["objects"]["shape"][0]], colours[ex["objects"]["colour"][0]]
      path = root / split / shape / f"{colour}_{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(ex["image"]).save(path)  # PNG: the same pixels as the world's.
  return root


@pytest.mark.xdist_group(TRAINED_CLIP_GROUP)
def test_eval_benchmarks_on_a_folder_dataset(trained_clip, shapes_folder, data_dir, tmp_path):
  workdir, _ = trained_clip
  out = tmp_path / "bench"
  stdout = cli("experiments.evaluate", f"--workdir={workdir}", f"--data_dir={data_dir}",
               f"--benchmarks=folder:{shapes_folder},shapes_world/shape",
               "--tasks=zeroshot_classification,linear_probe", "--templates=shapes_shape",
               f"--out={out}", f"--cache_dir={tmp_path / 'cache'}", "--batch_size=64")
  assert "waiting for input" in stdout  # The timing line.
  assert "**zeroshot_classification**" in stdout and "**linear_probe**" in stdout
  records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
  assert len(records) == 4  # Two datasets x two tasks.
  by_key = {(r["dataset"], r["task"]): r for r in records}
  for record in records:
    assert tuple(record) == results.SCHEMA_KEYS
    assert record["pretrained"].endswith("@1800")
  folder = by_key[(f"folder:{shapes_folder}", "zeroshot_classification")]["metrics"]
  shapes = by_key[("shapes_world/shape", "zeroshot_classification")]["metrics"]
  # The folder's test images are the world's single-object test scenes, with
  # the same class names and templates: the same numbers, from another path.
  assert folder == pytest.approx(shapes, abs=1e-6)
  # ... which are the run's own evaluator's numbers.
  own = json.loads((workdir / "results.json").read_text())["metrics"]
  assert shapes["acc1"] == pytest.approx(own["zero_shot_shape/acc1"], abs=1e-6)
  chance = 1 / 8
  assert folder["acc1"] > 3 * chance
  probe = by_key[(f"folder:{shapes_folder}", "linear_probe")]["metrics"]
  assert probe["lp_acc1"] > 3 * chance and probe["lp_wd"] >= 0
  assert (out / "results.csv").exists() and (out / "results.md").exists()


@pytest.mark.xdist_group(TRAINED_CLIP_GROUP)
def test_embed_and_search(trained_clip, shapes_folder, tmp_path):
  workdir, _ = trained_clip
  texts = tmp_path / "texts.txt"
  texts.write_text("a blue square.\na red circle.\n\na green triangle.\n")
  index_path = tmp_path / "index.npz"
  cli("experiments.embed", f"--workdir={workdir}", f"--images={shapes_folder / 'test'}",
      f"--texts={texts}", f"--out={index_path}")
  with np.load(index_path, allow_pickle=False) as index:
    paths = list(index["image_paths"])
    zimg, ztxt = index["image_embeddings"], index["text_embeddings"]
    assert list(index["texts"]) == ["a blue square.", "a red circle.", "a green triangle."]
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, atol=1e-5)
  assert len(paths) == len(list((shapes_folder / "test").rglob("*.png")))
  # Each text ranks the images of the colour it names far above chance (the
  # tiny model's shape knowledge is too weak to ask for more): of its top k,
  # k the folder's count of that colour, at least 3x the colour's share
  # are that colour (R-precision; it was 0.88, 0.36 and 0.71 against
  # shares of 0.12, 0.075 and 0.16).
  for text, z in zip(("a blue square.", "a red circle.", "a green triangle."), ztxt):
    is_colour = np.array([f"/{text.split()[1]}_" in p for p in paths])
    top = np.argsort(-(zimg @ z))[:is_colour.sum()]
    assert is_colour[top].mean() >= 3 * is_colour.mean(), (text, is_colour[top].mean())
  # An image of the index finds itself first, at similarity 1.
  query = paths[3]
  stdout = cli("experiments.search", f"--index={index_path}", f"--image={query}", "--k=3")
  lines = stdout.splitlines()
  assert lines[0] == "Nearest images:" and lines[1].split() == ["1.0000", query]
  # The search command, asked by text: its best image is of the colour
  # named, and it finds the text itself among the texts.
  stdout = cli("experiments.search", f"--index={index_path}", "--text=a red circle.")
  lines = stdout.splitlines()
  assert "/red_" in lines[1].split()[1], stdout
  texts_at = lines.index("Nearest texts:")
  assert lines[texts_at + 1].split(maxsplit=1) == ["1.0000", "a red circle."]
