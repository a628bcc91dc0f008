"""Tests for preprocessing op strings: parsing errors and what each op does."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from multimodal.data import preprocess as pp, tokenizer as tokenizer_lib

pytestmark = pytest.mark.unit


def image(h: int = 8, w: int = 12, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def seeded(seed: int, **features) -> dict:
  return {**features, "_seed": tf.constant([seed, 17], tf.int64)}


def run(spec: str, example: dict, **kwargs) -> dict:
  out = pp.build(spec, **kwargs)(example)
  return tf.nest.map_structure(lambda v: v.numpy(), out)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "pp.model"
  texts = [f"a {c} {s} left of a {o}." for c in ("red", "blue", "green")
           for s in ("circle", "star", "square") for o in ("heart", "cross")]
  tokenizer_lib.train_sentencepiece(texts * 5, str(path), vocab_size=48)
  return tokenizer_lib.Tokenizer(str(path))


# --- parse -------------------------------------------------------------------

def test_parse_valid_spec():
  calls = pp.parse('decode|resize(64)|value_range(-1, 1)|flip_lr|'
                   'choice(inkey="captions", outkey="text")|'
                   'tokenize(max_len=16, inkey="text", outkey="tokens")|'
                   'keep("image", "tokens")')
  assert [c.name for c in calls] == ["decode", "resize", "value_range",
                                     "flip_lr", "choice", "tokenize", "keep"]
  assert calls[1].args == (64,) and calls[2].args == (-1, 1)
  assert calls[5].kwargs == {"max_len": 16, "inkey": "text", "outkey": "tokens"}
  assert str(calls[6]) == "keep('image', 'tokens')"


def test_parse_unknown_op_suggests_closest():
  spec = "decode|resise(64)|value_range(-1, 1)"
  with pytest.raises(pp.PreprocessError) as info:
    pp.parse(spec)
  msg = str(info.value)
  assert "'resise'" in msg and spec in msg
  assert "Did you mean 'resize'" in msg
  assert "central_crop(size, key='image')" in msg  # Lists all valid ops.
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("spec, expected", [
    ("resize(-3)", "size must be >= 1"),
    ("resize((64, 0))", "width must be >= 1"),
    ("resize('big')", "size must be an int"),
    ("resize(64, method='fancy')", "method must be one of"),
    ("resize_small(0)", "size must be >= 1"),
    ("resize_small((64, 32))", "size must be an int"),
    ("resize_small(64, method='cubic')", "method must be one of"),
    ("resize_small(64, antialias=1)", "antialias must be a bool"),
    ("normalize(0.5)", "missing a required argument: 'std'"),
    ("normalize((0.5, 'a', 0.5), 1)", "mean[1] must be a number"),
    ("normalize((), 1)", "mean must be a number or a non-empty sequence"),
    ("normalize(0, (1, 0, 1))", "std must not contain 0"),
    ("normalize(0, 1, key='')", "key must be a non-empty string"),
    ("value_range(1)", "missing a required argument: 'vmax'"),
    ("value_range('a', 1)", "vmin must be a number"),
    ("value_range(0, 1, in_min=3, in_max=3)", "must differ"),
    ("flip_lr(keyy='image')", "unexpected keyword argument 'keyy'"),
    ("keep()", "at least one key"),
    ("keep(image)", "strings need quotes"),
    ("tokenize(16, tokenizer='x')", "unexpected keyword argument 'tokenizer'"),
    ("tokenize(max_len=0)", "max_len must be >= 1"),
    ("decode(*['image'])", "not allowed"),
])
def test_parse_bad_args_name_op_and_problem(spec, expected):
  with pytest.raises(pp.PreprocessError) as info:
    pp.parse(f"decode|{spec}")
  msg = str(info.value)
  assert expected in msg, msg
  assert spec.split("(")[0] in msg


@pytest.mark.parametrize("spec", [
    "decode||resize(64)", "decode|resize(64", "decode|", "", "  ",
    "decode|resize(64)+1", "decode|a.b", "decode|resize(64)(3)",
    "decode|resize(__import__('os').getcwd())",
])
def test_parse_bad_syntax(spec):
  with pytest.raises(pp.PreprocessError):
    pp.parse(spec)


def test_parse_does_no_tf_work():
  graph = tf.Graph()
  with graph.as_default():  # Any TF op created by parse would land here.
    pp.parse("decode|resize(8)|resize_small(6)|central_crop(4)|random_crop(2)"
             "|value_range(0, 1)|normalize((0.5, 0.4, 0.3), 0.2)|flip_lr|choice('c', 't')|tokenize(8)|object_label|copy('a', 'b')"
             "|rename(x='b')|drop('x')|keep('image')")
  assert graph.get_operations() == []


def test_build_tokenize_without_tokenizer_fails_early():
  with pytest.raises(pp.PreprocessError, match="needs a tokenizer"):
    pp.build("tokenize(16)")


def test_describe_ops_lists_every_op():
  text = pp.describe_ops()
  for name in pp.OPS:
    assert f"  {name}(" in text
  assert "tokenizer" not in text.split("tokenize(")[1].split(":")[0]


# --- ops ---------------------------------------------------------------------

def test_decode_png_bytes_equals_original():
  img = image()
  png = tf.io.encode_png(img)
  out = run("decode", {"image": png})["image"]
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, img)
  # An already decoded uint8 image passes through.
  out = run("decode", {"image": tf.constant(img)})["image"]
  np.testing.assert_array_equal(out, img)


def test_resize_shape_and_dtype():
  ex = {"image": tf.constant(image(8, 12))}
  out = run("resize(4)", ex)["image"]
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8  # Keeps uint8.
  out = run("resize((6, 10))|value_range(0, 1)", ex)["image"]
  assert out.shape == (6, 10, 3) and out.dtype == np.float32
  # A constant image stays constant (no overshoot past uint8 range).
  flat = {"image": tf.fill([9, 9, 3], tf.constant(255, tf.uint8))}
  out = run("resize(4, method='bicubic')", flat)["image"]
  np.testing.assert_array_equal(out, 255)


@pytest.mark.parametrize("hw, size, expected", [
    ((10, 6), 4, (6, 4)),   # Portrait: the width becomes 4.
    ((6, 10), 4, (4, 6)),   # Landscape: the height becomes 4.
    ((9, 9), 4, (4, 4)),
    ((7, 3), 2, (4, 2)),    # 2 * 7 / 3 = 4.67: truncated like HF, not rounded.
    ((3, 7), 6, (6, 14)),   # Enlarging.
    ((1000, 231), 224, (969, 224)),  # 969.7 -> 969.
])
def test_resize_small_shape(hw, size, expected):
  out = run(f"resize_small({size})", {"image": tf.constant(image(*hw))})["image"]
  assert out.shape == (*expected, 3) and out.dtype == np.uint8  # Keeps uint8.


def test_resize_small_values_and_dtypes():
  img = image(8, 12)
  # Same as resize to the computed size, for uint8 and float input.
  np.testing.assert_array_equal(
      run("resize_small(4, method='bilinear')", {"image": tf.constant(img)})["image"],
      run("resize((4, 6), method='bilinear')", {"image": tf.constant(img)})["image"])
  out = run("value_range(0, 1)|resize_small(4)", {"image": tf.constant(img)})["image"]
  assert out.shape == (4, 6, 3) and out.dtype == np.float32
  # The shorter side already at size: bicubic leaves the image unchanged.
  out = run("resize_small(8)", {"image": tf.constant(img)})["image"]
  np.testing.assert_array_equal(out, img)
  flat = {"image": tf.fill([9, 13, 3], tf.constant(255, tf.uint8))}
  np.testing.assert_array_equal(run("resize_small(5)", flat)["image"], 255)


def test_resize_small_in_tf_data_with_varying_shapes():
  shapes = [(10, 6), (6, 10), (7, 3)]
  ds = tf.data.Dataset.from_generator(
      lambda: ({"image": image(*hw, seed=i)} for i, hw in enumerate(shapes)),
      output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8)})
  outs = list(ds.map(pp.build("resize_small(4)|central_crop(4)")).as_numpy_iterator())
  assert [o["image"].shape for o in outs] == [(4, 4, 3)] * 3


def test_normalize_matches_numpy():
  img = image(5, 7)
  mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
  out = run(f"normalize({mean}, {std})", {"image": tf.constant(img)})["image"]
  assert out.dtype == np.float32
  expected = (img.astype(np.float32) - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  # Scalars apply to every channel; after value_range(0, 1) as in HF specs.
  out = run("value_range(0, 1)|normalize(mean=0.5, std=0.5)",
            {"image": tf.constant(img)})["image"]
  np.testing.assert_allclose(out, img / 127.5 - 1, rtol=0, atol=1e-6)
  with pytest.raises(pp.PreprocessError, match="mean has 3 values but 'image' has 1"):
    pp.build("normalize((1, 2, 3), 1)")({"image": tf.zeros([2, 2, 1])})


def test_crops():
  img = image(8, 10)
  out = run("central_crop(4)", {"image": tf.constant(img)})["image"]
  np.testing.assert_array_equal(out, img[2:6, 3:7])
  out = run("central_crop((2, 6))", {"image": tf.constant(img)})["image"]
  np.testing.assert_array_equal(out, img[3:5, 2:8])
  crops = [run("random_crop(3)", seeded(s, image=tf.constant(img)))["image"]
           for s in range(6)]
  for crop in crops:
    assert crop.shape == (3, 3, 3)
    # The crop is a window of the image.
    assert any(np.array_equal(crop, img[i:i + 3, j:j + 3])
               for i in range(6) for j in range(8))
  assert len({c.tobytes() for c in crops}) > 1


def test_crop_to_object_centres_a_square_on_the_box_inside_the_image():
  img = image(40, 60)
  # An object at rows 10..20, cols 30..36 (normalised yxyx box).
  box = [10 / 40, 30 / 60, 20 / 40, 36 / 60]
  objects = {"bbox": tf.constant([box, [0, 0, 1, 1]], tf.float32)}
  out = run("crop_to_object(margin=0.5)", {"image": img, "objects": objects})["image"]
  # Side = longer side 10 x (1 + 2 x 0.5) = 20, centred on (15, 33).
  np.testing.assert_array_equal(out, img[5:25, 23:43])
  # Near the border the window shifts inside (a 4 x 6 px box: side 12, which
  # centred on (2, 3) would start above and left of the image); a huge
  # margin is capped at the shorter side.
  corner = {"bbox": tf.constant([[0.0, 0.0, 0.1, 0.1]], tf.float32)}
  out = run("crop_to_object(margin=0.5)", {"image": img, "objects": corner})["image"]
  np.testing.assert_array_equal(out, img[0:12, 0:12])
  out = run("crop_to_object(margin=50)", {"image": img, "objects": corner})["image"]
  np.testing.assert_array_equal(out, img[0:40, 0:40])
  # The second object.
  out = run("crop_to_object(margin=0, index=1)", {"image": img, "objects": objects})["image"]
  assert out.shape == (40, 40, 3)
  with pytest.raises(ValueError, match="margin"):
    pp.build("crop_to_object(margin=-1)")


def test_value_range_endpoints_exact():
  x = tf.constant([[[0, 255, 51]]], tf.uint8)
  out = run("value_range(-1, 1)", {"image": x})["image"]
  assert out.dtype == np.float32
  assert out[0, 0, 0] == -1.0 and out[0, 0, 1] == 1.0
  np.testing.assert_allclose(out[0, 0, 2], -0.6, rtol=1e-6)
  out = run("value_range(0, 1)", {"image": x})["image"]
  assert out[0, 0, 0] == 0.0 and out[0, 0, 1] == 1.0


def test_flip_lr_is_seeded_and_exact():
  img = image()
  flipped = []
  for seed in range(16):
    out = run("flip_lr", seeded(seed, image=tf.constant(img)))["image"]
    again = run("flip_lr", seeded(seed, image=tf.constant(img)))["image"]
    np.testing.assert_array_equal(out, again)  # Same seed, same result.
    if np.array_equal(out, np.fliplr(img)):
      flipped.append(seed)
    else:
      np.testing.assert_array_equal(out, img)
  assert 0 < len(flipped) < 16  # Some seeds flip, others do not.


def test_random_ops_need_seed():
  with pytest.raises(pp.PreprocessError, match="_seed"):
    pp.build("flip_lr")({"image": tf.constant(image())})
  with pytest.raises(pp.PreprocessError, match="_seed"):
    pp.build("keep('image')|flip_lr")(seeded(0, image=tf.constant(image())))
  # Inside tf.data the error keeps its type and message.
  ds = tf.data.Dataset.from_tensors({"image": tf.constant(image())})
  with pytest.raises(pp.PreprocessError, match="flip_lr"):
    ds.map(pp.build("decode|flip_lr"))


def test_random_ops_get_distinct_seeds():
  # Two choice ops on the same list with the same example seed must not
  # always agree: each op position folds its index into the seed.
  spec = "choice(inkey='x', outkey='a')|choice(inkey='x', outkey='b')"
  values = tf.constant(np.arange(100))
  outs = [run(spec, seeded(s, x=values)) for s in range(8)]
  assert any(o["a"] != o["b"] for o in outs)
  assert all(np.array_equal(o["_seed"], [s, 17]) for s, o in enumerate(outs))


def test_choice_picks_an_element_reproducibly():
  caps = ["a red star", "a blue heart", "a green cross", "a cyan circle"]
  ex = lambda s: seeded(s, captions=tf.constant(caps))
  spec = "choice(inkey='captions', outkey='text')"
  picks = [run(spec, ex(s))["text"].decode() for s in range(20)]
  assert set(picks) <= set(caps) and len(set(picks)) > 1
  assert picks == [run(spec, ex(s))["text"].decode() for s in range(20)]
  out = run("choice('captions')", ex(0))
  assert out["captions"].decode() in caps  # outkey defaults to inkey.


def test_keep_drop_rename_copy():
  ex = seeded(0, image=tf.zeros([2, 2, 3]), label=tf.constant(3),
              text=tf.constant("hi"))
  assert set(run("keep('image', 'label')", ex)) == {"image", "label"}
  assert set(run("drop('text')", ex)) == {"image", "label", "_seed"}
  out = run("rename(caption='text')", ex)
  assert "text" not in out and out["caption"] == b"hi"
  out = run("copy('label', 'y')", ex)
  assert out["y"] == 3 and out["label"] == 3
  with pytest.raises(pp.PreprocessError, match="'missing'"):
    pp.build("keep('image', 'missing')")(ex)


def test_object_label():
  ex = {"objects": {"shape": tf.constant([5, 2], tf.int64),
                    "colour": tf.constant([1, 7], tf.int64)}}
  out = run("object_label", ex)
  assert out["label"] == 5 and out["label"].dtype == np.int32
  assert run("object_label('colour', outkey='c')", ex)["c"] == 1


def test_object_pair_label():
  ex = {"objects": {"shape": tf.constant([5, 2], tf.int64),
                    "colour": tf.constant([1, 7], tf.int64)}}
  out = run("object_pair_label", ex)
  assert out["label"] == 5 * 8 + 1 and out["label"].dtype == np.int32
  assert set(out) == {"objects", "label"}  # No helper keys leak out.
  assert run("object_pair_label('colour', 'shape', 10, outkey='y')", ex)["y"] == 1 * 10 + 5


def test_tokenize_matches_tokenizer_encode(tok):
  texts = ["a red circle left of a heart.", "a blue star."]
  for max_len in (12, 4):  # 4 truncates: EOS must still be last.
    out = run(f"tokenize({max_len}, inkey='text')",
              {"text": tf.constant(texts[0])}, tokenizer=tok)
    np.testing.assert_array_equal(out["tokens"],
                                  tok.encode(texts[0], max_len)[0])
  assert out["tokens"][-1] == tok.eos_id
  out = run("tokenize(12, inkey='captions', outkey='t')",
            {"captions": tf.constant(texts)}, tokenizer=tok)
  np.testing.assert_array_equal(out["t"], tok.encode(texts, 12))


def test_in_tf_data_map(tok):
  imgs = np.stack([image(10, 10, seed=i) for i in range(4)])
  pngs = [tf.io.encode_png(im).numpy() for im in imgs]
  captions = [[f"a red star {i}.", f"a blue heart {i}."] for i in range(4)]
  ds = tf.data.Dataset.from_tensor_slices({
      "image": pngs, "captions": captions,
      "objects": {"shape": [[i, 0] for i in range(4)]}})

  def add_seed(index, example):  # What the input pipeline does.
    return {**example, "_seed": tf.stack([tf.constant(7, tf.int64), index])}

  ds = ds.enumerate().map(add_seed)
  spec = ("decode|resize(8)|value_range(-1, 1)|flip_lr|"
          "choice(inkey='captions', outkey='text')|tokenize(6)|object_label|"
          "keep('image', 'tokens', 'label')")
  fn = pp.build(spec, tokenizer=tok)
  batches = list(ds.map(fn).batch(2).as_numpy_iterator())
  assert len(batches) == 2
  b = batches[0]
  assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["tokens"].shape == (2, 6) and b["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batches[1]["label"], [2, 3])
  # The whole pipeline is a pure function of the example seeds.
  again = list(ds.map(fn).batch(2).as_numpy_iterator())
  for x, y in zip(batches, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
