"""Prompt templates and class names: this repo's own sets and CLIP_benchmark's
shipped as package data, with their lookup by benchmark dataset name."""
import json

import pytest

from multimodal.data import templates

pytestmark = pytest.mark.unit


def test_imagenet_has_clips_80_templates_with_one_placeholder():
  imagenet = templates.get("imagenet")
  assert len(imagenet) == 80 and len(set(imagenet)) == 80
  assert imagenet == templates.get("imagenet1k")
  for t in imagenet:
    assert t.count("{}") == 1 and "{c}" not in t
    assert t.format("goldfish").count("goldfish") == 1
  assert "a photo of a goldfish." in {t.format("goldfish") for t in imagenet}


def test_every_shipped_template_formats_with_one_name():
  for key in templates._benchmark_templates():
    for t in templates.get(key):
      assert t.format("XYZ").count("XYZ") == 1, (key, t)
  # Literal double quotes of CLIP_benchmark's templates survive.
  assert templates.get("mnist") == ('a photo of the number: "{}".',)


def test_literal_braces_survive_the_placeholder_conversion():
  converted = templates._to_format_string("a {x} of {c} }")
  assert converted.format("cat") == "a {x} of cat }"


def test_cifar10_lookup():
  assert templates.for_dataset("cifar10") == templates.get("cifar10")
  assert len(templates.for_dataset("cifar10")) == 18
  assert templates.classnames("cifar10") is None  # TFDS's own names are used.


@pytest.mark.parametrize("name", ["imagenet2012", "imagenet2012:5.1.0", "imagenet"])
def test_tfds_imagenet2012_maps_to_imagenet1k(name):
  assert templates.for_dataset(name) == templates.get("imagenet")
  names = templates.classnames(name)
  assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]


@pytest.mark.parametrize("name,key,count", [
    ("oxford_iiit_pet", "pets", 37), ("oxford_flowers102", "flowers", 102),
    ("eurosat/rgb", "eurosat", 10), ("svhn_cropped", "svhn", 10),
    ("patch_camelyon", "pcam", 2)])
def test_tfds_aliases(name, key, count):
  assert templates.for_dataset(name) == templates.get(key)
  assert templates.classnames(name) == templates.classnames(key)
  assert len(templates.classnames(name)) == count


def test_tfds_configs_and_template_only_sets():
  assert templates.for_dataset("cars196") == templates.get("cars")
  assert templates.for_dataset("sun397/tfds") == templates.get("sun397")
  assert templates.classnames("cars196") is None


def test_tfds_caltech101_takes_the_alphabetical_vtab_names():
  assert templates.for_dataset("caltech101") == templates.get("caltech101")
  names = templates.classnames("caltech101")
  assert names == templates.classnames("caltech101_vtab")
  assert names[:5] == ["accordion", "airplane", "anchor", "ant", "background"]


@pytest.mark.parametrize("name", ["stanford_dogs", "no_such_dataset", "folder:/data/x"])
def test_unknown_dataset_falls_back_to_simple(name):
  assert templates.for_dataset(name) == ("a photo of a {}.",)
  assert templates.classnames(name) is None


def test_classnames_returns_a_fresh_list():
  templates.classnames("pets").append("not a pet")
  assert len(templates.classnames("pets")) == 37


def test_own_sets_still_work():
  assert templates.get("simple") == ("a photo of a {}.",)
  for name in ("shapes_shape", "shapes_colour", "shapes_shape_generic",
               "shapes_colour_generic"):
    sets = templates.get(name)
    assert sets and all(t.count("{}") == 1 for t in sets)
  with pytest.raises(ValueError, match="unknown template set 'nope'.*shapes_shape"):
    templates.get("nope")


def test_shipped_json_is_valid_and_has_its_notice():
  from importlib import resources
  data = resources.files("multimodal.data") / "third_party"
  t = json.loads((data / "en_zeroshot_classification_templates.json").read_text())
  c = json.loads((data / "en_classnames.json").read_text())
  assert len(t["imagenet1k"]) == 80 and len(c["imagenet1k"]) == 1000
  assert "MIT License" in (data / "NOTICE.md").read_text()


def test_read_classnames_json(tmp_path):
  path = tmp_path / "names.json"
  path.write_text(json.dumps(["cat", "dog"]))
  assert templates.read_classnames_file(path) == ["cat", "dog"]
  assert templates.read_classnames_file(str(path)) == ["cat", "dog"]


def test_read_classnames_text(tmp_path):
  path = tmp_path / "names.txt"
  path.write_text("cat\n\n  dog  \nsea lion\n\n")
  assert templates.read_classnames_file(path) == ["cat", "dog", "sea lion"]


@pytest.mark.parametrize("filename,content,message", [
    ("missing.txt", None, "cannot read"),
    ("empty.txt", "\n \n", "no class names"),
    ("empty.json", "[]", "no class names"),
    ("bad.json", "[\"cat\",", "not valid JSON"),
    ("dict.json", "{\"a\": 1}", "list of strings"),
    ("ints.json", "[1, 2]", "list of strings"),
])
def test_read_classnames_errors_name_the_file(tmp_path, filename, content, message):
  path = tmp_path / filename
  if content is not None:
    path.write_text(content)
  with pytest.raises(ValueError, match=message) as e:
    templates.read_classnames_file(path)
  assert str(path) in str(e.value)
