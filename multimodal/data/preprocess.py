"""Composable preprocessing op strings, like big_vision's `pp` strings.

A spec is ops joined by `|`, each `name` or `name(args)` with Python-literal
arguments, e.g. `decode|resize(64)|value_range(-1, 1)|flip_lr|keep("image")`.
`parse(spec)` validates it in pure Python, so a bad config fails when it is
loaded, not deep inside tf.data; `build(spec)` returns fn(example) -> example
over dicts of tf tensors, for `tf.data.Dataset.map`.

Ops are factories in the plain dict `OPS`. A factory only checks its arguments
and returns a closure (parse() calls it to validate); TF work happens only in
the closure. Random ops are stateless: they read `example["_seed"]` (int64 [2],
added per example by the input pipeline), and build() gives op number i that
seed folded with i, so two random ops never share randomness.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epy

# Parsing a spec (what a config check does) needs no TensorFlow: it loads on
# the first use of `tf`, when build()'s ops run, so a config typo fails fast.
with epy.lazy_imports():
  import tensorflow as tf

Op = Callable[[dict], dict]

SEED_KEY = "_seed"
# Per-example int32 counters (0 or 1) of records a training stream handled
# rather than skipped. The training input pipeline adds them, set to 0,
# before the pp; ops update them; `keep` keeps them; the pipeline sums them
# into its metrics. Their presence also marks the training stream, where an
# op may fail on a record it cannot use (an empty caption) because the
# pipeline skips that record; an evaluation stream, which has no counters,
# sees every record handled as before.
COUNT_PREFIX = "_count_"
CONVERTED_IMAGES = COUNT_PREFIX + "converted_images"
TRUNCATED_TEXTS = COUNT_PREFIX + "truncated_captions"
COUNT_KEYS = (CONVERTED_IMAGES, TRUNCATED_TEXTS)
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3",
                  "lanczos5", "gaussian", "mitchellcubic")
# Factory parameters that build() supplies; a spec cannot set them.
_RESOURCE_PARAMS = ("tokenizer",)


class PreprocessError(ValueError):
  """A preprocessing spec is invalid or cannot be applied to an example."""


@dataclasses.dataclass(frozen=True)
class OpCall:
  """One parsed op of a spec: `name(*args, **kwargs)`."""
  name: str
  args: tuple = ()
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    parts = [repr(a) for a in self.args]
    parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
    return f"{self.name}({', '.join(parts)})" if parts else self.name


# --- Argument checks: pure Python; parse() adds the op and spec to the message.

def _int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _number(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a number, got {value!r}")
  return float(value)


def _key(name: str, value) -> str:
  if not isinstance(value, str) or not value:
    raise TypeError(f"{name} must be a non-empty string key, got {value!r}")
  return value


def _keys(keys: tuple) -> None:
  if not keys:
    raise ValueError("needs at least one key")
  for k in keys:
    _key("key", k)


def _size(value) -> tuple[int, int]:
  """An int (square) or an (h, w) pair of positive ints."""
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(f"size must be an int or (height, width), got {value!r}")
    return _int("height", value[0]), _int("width", value[1])
  return _int("size", value), _int("size", value)


def _numbers(name: str, value) -> tuple[float, ...]:
  """A number or a non-empty sequence of numbers (e.g. one per channel)."""
  if isinstance(value, (tuple, list)):
    if not value:
      raise ValueError(f"{name} must be a number or a non-empty sequence, got {value!r}")
    return tuple(_number(f"{name}[{i}]", v) for i, v in enumerate(value))
  return (_number(name, value),)


def _method(method) -> str:
  if method not in RESIZE_METHODS:
    raise ValueError(f"method must be one of {RESIZE_METHODS}, got {method!r}")
  return method


def _bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {value!r}")
  return value


def _resize_image(image: tf.Tensor, size, method: str, antialias: bool) -> tf.Tensor:
  """tf.image.resize that keeps the dtype: an integer image is rounded and clipped."""
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  if image.dtype.is_integer:
    # Bilinear/bicubic overshoot the input range: round and clip, then cast.
    out = tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
  return tf.cast(out, image.dtype)


# --- Helpers for op closures (they run when tf.data traces the map function).

def _get(example: Mapping, key: str):
  if key not in example:
    raise PreprocessError(
        f"key {key!r} is not in the example; it has {sorted(example)}")
  return example[key]


def _count(example: dict, key: str, flag) -> None:
  """Marks this example as counted under `key`, if the stream counts."""
  if key in example:
    example[key] = tf.maximum(example[key], tf.cast(flag, tf.int32))


def _reject_empty_text(example: Mapping, op: str, key: str, empty, value):
  """In a training stream, `value` behind a check that fails on empty text
  (the pipeline then skips the record); elsewhere `value` as is."""
  if TRUNCATED_TEXTS not in example:
    return value
  check = tf.debugging.Assert(tf.logical_not(empty),
                              [f"{op}: the text in {key!r} is empty"])
  with tf.control_dependencies([check]):
    return tf.nest.map_structure(tf.identity, value)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Channels of a PNG by IHDR colour type: grey, RGB, palette, grey+alpha, RGBA.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _needs_conversion(value: tf.Tensor, channels: int) -> tf.Tensor:
  """True when the encoded image is not `channels` x 8 bits as stored: a
  greyscale, grey+alpha or RGBA PNG or JPEG (CMYK) for 3 channels, or a
  16-bit PNG. Read from the header alone (PNG: IHDR; JPEG: its frame)."""
  head = tf.strings.substr(value, 0, 26)
  head = tf.io.decode_raw(tf.strings.substr(
      tf.strings.join([head, tf.constant(b"\0" * 26)]), 0, 26), tf.uint8)
  is_png = tf.reduce_all(tf.equal(head[:8], tf.constant(list(_PNG_SIGNATURE), tf.uint8)))
  depth, colour_type = tf.cast(head[24], tf.int32), tf.cast(head[25], tf.int32)
  png_channels = tf.constant(0)
  for code, n in _PNG_CHANNELS.items():
    png_channels = tf.where(tf.equal(colour_type, code), n, png_channels)
  png_converted = is_png & (tf.not_equal(png_channels, channels) | tf.equal(depth, 16))
  jpeg_converted = tf.cond(
      tf.io.is_jpeg(value),
      lambda: tf.not_equal(tf.io.extract_jpeg_shape(value)[2], channels),
      lambda: tf.constant(False))
  return png_converted | jpeg_converted


def _seed(example: Mapping) -> tf.Tensor:
  if SEED_KEY not in example:
    raise PreprocessError(
        f"this op is random and needs example[{SEED_KEY!r}], an int64 tensor "
        "of shape [2]. The input pipeline must add a per-example seed before "
        "preprocessing, and no earlier keep/drop may remove it.")
  return example[SEED_KEY]


# --- Ops. Each factory checks its arguments and returns fn(example) -> example.

def decode(key="image", channels=3) -> Op:
  """Decodes image bytes (PNG/JPEG/GIF/BMP) to uint8 [H, W, channels].

  A uint8 tensor (TFDS decodes images unless the pipeline passes
  tfds.decode.SkipDecoding()) passes through unchanged, so specs need not care.
  Other layouts are converted: greyscale becomes RGB (the grey value in each
  channel), RGBA drops its alpha channel, and a 16-bit PNG becomes 8-bit as
  value >> 8 (0..65535 onto 0..255, within 1 of round(value / 257)); a
  training stream counts these images (CONVERTED_IMAGES).
  """
  _key("key", key)
  _int("channels", channels)

  def fn(example):
    value = _get(example, key)
    if value.dtype == tf.uint8:
      return example
    if value.dtype != tf.string:
      raise PreprocessError(
          f"decode: {key!r} must hold image bytes or uint8, got {value.dtype}")
    image = tf.io.decode_image(value, channels=channels,
                               expand_animations=False)
    image.set_shape([None, None, channels])
    example = {**example, key: image}
    if CONVERTED_IMAGES in example:
      _count(example, CONVERTED_IMAGES, _needs_conversion(value, channels))
    return example
  return fn


def resize(size, key="image", method="bilinear", antialias=True) -> Op:
  """Resizes to size (int: square, or (h, w)); keeps the dtype, like big_vision.

  uint8 in -> uint8 out (rounded, clipped); float in -> float out. Follow it
  with value_range to get float32. antialias=True avoids aliasing when
  shrinking a lot (it does nothing when enlarging).
  """
  h, w = _size(size)
  _key("key", key)
  _method(method)
  _bool("antialias", antialias)

  def fn(example):
    image = _get(example, key)
    return {**example, key: _resize_image(image, (h, w), method, antialias)}
  return fn


def resize_small(size, key="image", method="bicubic", antialias=True) -> Op:
  """Resizes so the shorter side is size, keeping the aspect ratio; keeps the dtype.

  The longer side becomes floor(size * long / short), truncated exactly as
  Hugging Face image processors do for size={"shortest_edge": size} (and
  torchvision's Resize(int)); a square image becomes size x size. Like
  resize, uint8 in -> uint8 out; antialias=True matches PIL, which always
  filters over the whole footprint when shrinking.
  """
  size = _int("size", size)
  _key("key", key)
  _method(method)
  _bool("antialias", antialias)

  def fn(example):
    image = _get(example, key)
    shape = tf.shape(image, out_type=tf.int64)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    # Integer floor division is exact, and equals HF's int(size * long / short)
    # in float64: that quotient is never within float error of an integer.
    new_h = tf.where(h <= w, tf.constant(size, tf.int64), size * h // short)
    new_w = tf.where(h <= w, size * w // short, tf.constant(size, tf.int64))
    new_size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    return {**example, key: _resize_image(image, new_size, method, antialias)}
  return fn


def central_crop(size, key="image") -> Op:
  """Crops the central size (int or (h, w)) window; fails on smaller images.

  The window starts at ((H - h) // 2, (W - w) // 2), the same pixels as HF's
  center_crop; HF would zero-pad a too-small image where this op fails.
  """
  h, w = _size(size)
  _key("key", key)

  def fn(example):
    image = _get(example, key)
    shape = tf.shape(image)
    # crop_to_bounding_box fails loudly on a too-small image instead of
    # returning a smaller one that would only break batching later.
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - h) // 2, (shape[1] - w) // 2, h, w)
    return {**example, key: image}
  return fn


def crop_to_object(margin=0.25, index=0, key="image", inkey="objects") -> Op:
  """Crops a square window centred on one object's box (TFDS BBoxFeature,
  normalised [ymin, xmin, ymax, xmax] in example[inkey]["bbox"]).

  The side is the box's longer side times (1 + 2 * margin), at most the
  image's shorter side, and the window is shifted to stay inside the image.
  The output size varies with the object: follow it with resize. Object-
  centred crops let a small generative model spend its capacity on the
  object instead of on the empty background around it.
  """
  margin = _number("margin", margin)
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  index = _int("index", index, minimum=0)
  _key("key", key)
  _key("inkey", inkey)

  def fn(example):
    image = _get(example, key)
    boxes = _get(_get(example, inkey), "bbox")
    with tf.control_dependencies([tf.debugging.assert_greater(
        tf.shape(boxes)[0], index, message=f"crop_to_object: no object {index}")]):
      box = tf.cast(boxes[index], tf.float32)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    box_h, box_w = (box[2] - box[0]) * h, (box[3] - box[1]) * w
    side = tf.minimum(tf.maximum(box_h, box_w) * (1 + 2 * margin), tf.minimum(h, w))
    side = tf.maximum(tf.round(side), 1.0)
    top = tf.clip_by_value(tf.round((box[0] + box[2]) / 2 * h - side / 2), 0.0, h - side)
    left = tf.clip_by_value(tf.round((box[1] + box[3]) / 2 * w - side / 2), 0.0, w - side)
    side_px = tf.cast(side, tf.int32)
    out = tf.image.crop_to_bounding_box(image, tf.cast(top, tf.int32),
                                        tf.cast(left, tf.int32), side_px, side_px)
    return {**example, key: out}
  return fn


def random_crop(size, key="image") -> Op:
  """Crops a uniformly random size (int or (h, w)) window. Random: needs _seed."""
  h, w = _size(size)
  _key("key", key)

  def fn(example):
    image = _get(example, key)
    crop_shape = tf.concat([[h, w], tf.shape(image)[2:]], axis=0)
    out = tf.image.stateless_random_crop(image, crop_shape, seed=_seed(example))
    out.set_shape([h, w, image.shape[-1]])
    return {**example, key: out}
  return fn


def value_range(vmin, vmax, in_min=0, in_max=255, key="image") -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32 (no clipping)."""
  vmin, vmax = _number("vmin", vmin), _number("vmax", vmax)
  in_min, in_max = _number("in_min", in_min), _number("in_max", in_max)
  _key("key", key)
  if in_min == in_max:
    raise ValueError(f"in_min and in_max must differ, both are {in_min}")

  def fn(example):
    x = tf.cast(_get(example, key), tf.float32)
    # Going through [0, 1] maps the endpoints exactly onto vmin and vmax.
    x = (x - in_min) / (in_max - in_min)
    return {**example, key: vmin + x * (vmax - vmin)}
  return fn


def normalize(mean, std, key="image") -> Op:
  """Maps x to (x - mean) / std per channel, as float32 (HF image_mean/image_std).

  mean and std are numbers or one number per channel (e.g. 3-tuples for RGB).
  Follows value_range(0, 1) in specs for models normalised like CLIP.
  """
  mean_values, std_values = _numbers("mean", mean), _numbers("std", std)
  if any(s == 0 for s in std_values):
    raise ValueError(f"std must not contain 0, got {std!r}")
  _key("key", key)

  def fn(example):
    x = tf.cast(_get(example, key), tf.float32)
    channels = x.shape[-1]
    for name, values in (("mean", mean_values), ("std", std_values)):
      if len(values) > 1 and channels is not None and len(values) != channels:
        raise PreprocessError(
            f"normalize: {name} has {len(values)} values but {key!r} has "
            f"{channels} channels (shape {x.shape})")
    m = tf.constant(mean_values if len(mean_values) > 1 else mean_values[0], tf.float32)
    s = tf.constant(std_values if len(std_values) > 1 else std_values[0], tf.float32)
    return {**example, key: (x - m) / s}
  return fn


def flip_lr(key="image") -> Op:
  """Flips the image left-right with probability 0.5. Random: needs _seed."""
  _key("key", key)

  def fn(example):
    image = tf.image.stateless_random_flip_left_right(
        _get(example, key), seed=_seed(example))
    return {**example, key: image}
  return fn


def choice(inkey, outkey=None) -> Op:
  """Picks a random element of the 1-D tensor inkey into outkey (default inkey).

  E.g. choice(inkey="captions", outkey="text") picks one of several captions
  uniformly. Random: needs _seed. Fails at run time on an empty tensor.
  """
  _key("inkey", inkey)
  outkey = inkey if outkey is None else _key("outkey", outkey)

  def fn(example):
    values = _get(example, inkey)
    if values.shape.rank != 1:
      raise PreprocessError(
          f"choice needs a 1-D tensor in {inkey!r}, got shape {values.shape}")
    n = tf.shape(values)[0]
    with tf.control_dependencies(
        [tf.debugging.assert_positive(n, message=f"choice: {inkey} is empty")]):
      index = tf.random.stateless_uniform(
          [], seed=_seed(example), minval=0, maxval=n, dtype=tf.int32)
    return {**example, outkey: tf.gather(values, index)}
  return fn


def tokenize(max_len, inkey="text", outkey="tokens", *, tokenizer=None) -> Op:
  """Tokenizes a string to int32 [max_len] ids (1-D strings: [n, max_len]).

  Ids end with EOS and are padded with 0 (see Tokenizer.encode); a longer
  text is cut to fit. The tokenizer comes from build(spec, tokenizer=...),
  not from the spec. In a training stream the op counts cut texts
  (TRUNCATED_TEXTS) and fails on an empty (all-whitespace) text (1-D: on
  any), which the pipeline then skips; evaluation tokenizes an empty text
  to just EOS.
  """
  _int("max_len", max_len)
  _key("inkey", inkey)
  _key("outkey", outkey)

  def fn(example):
    if tokenizer is None:
      raise PreprocessError("tokenize needs build(spec, tokenizer=...)")
    text = _get(example, inkey)
    if TRUNCATED_TEXTS not in example:
      return {**example, outkey: tokenizer.tf_encode(text, max_len)}
    if _has_flags(tokenizer.tf_encode):
      tokens, truncated, empty = tokenizer.tf_encode(text, max_len, with_flags=True)
    else:  # A tokenizer that cannot tell: only ASCII whitespace is empty.
      tokens, truncated = tokenizer.tf_encode(text, max_len), False
      empty = tf.reduce_any(tf.equal(tf.strings.strip(text), ""))
    example = {**example, outkey: _reject_empty_text(
        example, "tokenize", inkey, empty, tokens)}
    _count(example, TRUNCATED_TEXTS, truncated)
    return example
  return fn


def _has_flags(tf_encode) -> bool:
  return "with_flags" in inspect.signature(tf_encode).parameters


def object_label(attribute="shape", outkey="label", inkey="objects") -> Op:
  """Sets outkey to example[inkey][attribute][0], int32: the 1st object's class.

  For zero-shot evaluation on single-object images. TFDS Sequence features
  arrive as e.g. example["objects"]["shape"], a 1-D tensor.
  """
  _key("attribute", attribute)
  _key("outkey", outkey)
  _key("inkey", inkey)

  def fn(example):
    values = _get(_get(example, inkey), attribute)
    with tf.control_dependencies([tf.debugging.assert_positive(
        tf.size(values), message=f"object_label: the example has no {inkey}")]):
      label = tf.cast(values[0], tf.int32)
    return {**example, outkey: label}
  return fn


def object_pair_label(first="shape", second="colour", num_second=8,
                      outkey="label", inkey="objects") -> Op:
  """Sets outkey to first * num_second + second for the 1st object, int32.

  One class per (first, second) pair, e.g. the 64 (shape, colour) classes a
  class-conditional generator of single-object scenes is conditioned on.
  """
  first_label = object_label(first, outkey="_first", inkey=inkey)
  second_label = object_label(second, outkey="_second", inkey=inkey)
  num_second = _int("num_second", num_second)
  _key("outkey", outkey)

  def fn(example):
    labels = second_label(first_label(example))
    label = labels["_first"] * num_second + labels["_second"]
    return {**example, outkey: label}
  return fn


def vlm_task(mode="mix", p_caption=0.3, caption_prompt="caption", questions=1,
             outkey_prompt="prompt", outkey_answer="answer") -> Op:
  """Picks (prompt, answer) strings for a vision-language model.

  "caption": the prompt is `caption_prompt` and the answer one of the
  example's captions; "vqa": one of its (question, answer) pairs; "mix": a
  caption with probability p_caption, else a question. Random choices read
  _seed; in an eval stream (whose seed is (0, example index)) they are a
  fixed function of the example's index, so every eval sees the same pairs.

  questions > 1 (modes "vqa" and "mix") asks up to that many of the example's
  questions, in a random order, in one text: prompt and answer are then 1-D
  [n] (a caption is one turn, [1]), the turns of a dialogue that vlm_text
  lays out one after the other. One image then teaches several answers for
  the price of one pass through the vision tower.
  """
  if mode not in ("mix", "caption", "vqa"):
    raise ValueError(f"mode must be 'mix', 'caption' or 'vqa', got {mode!r}")
  p_caption = _number("p_caption", p_caption)
  questions = _int("questions", questions)
  _key("outkey_prompt", outkey_prompt)
  _key("outkey_answer", outkey_answer)

  def pick(values, seed):
    index = tf.random.stateless_uniform([], seed, 0, tf.shape(values)[0], tf.int32)
    return index

  def fn(example):
    seed = _seed(example)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    captions = _get(example, "captions")
    caption = captions[pick(captions, seeds[0])]
    if mode == "caption":
      return {**example, outkey_prompt: tf.constant(caption_prompt),
              outkey_answer: caption}
    all_questions, all_answers = _get(example, "questions"), _get(example, "answers")
    if questions == 1:
      i = pick(all_questions, seeds[1])
      prompt, answer = all_questions[i], all_answers[i]
    else:
      order = tf.argsort(tf.random.stateless_uniform(tf.shape(all_questions), seeds[1]))
      order = order[:questions]
      prompt, answer = tf.gather(all_questions, order), tf.gather(all_answers, order)
    if mode == "mix":
      use_caption = tf.random.stateless_uniform([], seeds[2]) < p_caption
      if questions == 1:
        prompt = tf.where(use_caption, tf.constant(caption_prompt), prompt)
        answer = tf.where(use_caption, caption, answer)
      else:
        prompt, answer = tf.cond(
            use_caption, lambda: (tf.constant([caption_prompt]), caption[None]),
            lambda: (prompt, answer))
    return {**example, outkey_prompt: prompt, outkey_answer: answer}
  return fn


def vlm_text(max_len, prompt_key="prompt", answer_key="answer", *, tokenizer=None) -> Op:
  """Lays out prompt + answer + EOS as int32 "text" [max_len] with PaliGemma's
  masks: "mask_ar" (0 over the prompt, attended bidirectionally; 1 over the
  answer and EOS, causal), "mask_loss" (1 where the token is a training
  target: the answer and EOS) and "input_mask" (1 on real tokens). A long
  answer is cut so that EOS always fits; the prompt keeps its tokens. In a
  training stream, cut texts are counted (TRUNCATED_TEXTS) and an empty
  answer fails, so that the pipeline skips the record.

  1-D prompt and answer (vlm_task's `questions` > 1) are the turns of a
  dialogue: the first laid out as above, each later one after it as prompt
  + answer + EOS, causal, its answer and EOS targets. Later turns that do
  not fit whole are left out (not counted as cut).
  """
  max_len = _int("max_len", max_len, minimum=2)
  _key("prompt_key", prompt_key)
  _key("answer_key", answer_key)

  def ids_of(prompts, answers):
    """Each turn's (prompt ids, answer ids), without EOS (nor, for a
    tokenizer that starts sequences with BOS, Llama's, the BOS of anything
    but the first prompt: the rest continue its sequence). One call, and one
    position more than the layout has: a text with max_len or more ids still
    shows that it does not fit."""
    prompts, answers = np.atleast_1d(prompts), np.atleast_1d(answers)
    texts = [_as_str(t) for pair in zip(prompts, answers) for t in pair]
    rows = tokenizer.encode(texts, max_len + 1)
    ids = [row[:np.argmax(row == tokenizer.eos_id)] for row in rows]
    bos_id = getattr(tokenizer, "bos_id", None)
    if bos_id is not None:
      ids[1:] = [row[1:] if len(row) and row[0] == bos_id else row for row in ids[1:]]
    return list(zip(ids[0::2], ids[1::2]))

  def layout(turns):
    (p_ids, a_ids), later = turns[0], turns[1:]
    p_ids = p_ids[:max_len - 1]
    a_ids = a_ids[:max_len - len(p_ids) - 1]
    # (ids, mask_ar, mask_loss) segments; EOS ends every answer.
    segments = [(p_ids, 0, 0), (np.append(a_ids, tokenizer.eos_id), 1, 1)]
    n = len(p_ids) + len(a_ids) + 1
    for p_ids, a_ids in later:
      if n + len(p_ids) + len(a_ids) + 1 <= max_len:
        segments += [(p_ids, 1, 0), (np.append(a_ids, tokenizer.eos_id), 1, 1)]
        n += len(p_ids) + len(a_ids) + 1
    out = np.full((4, max_len), 0, np.int32)
    out[0, n:] = tokenizer.pad_id
    out[3, :n] = 1  # input_mask
    start = 0
    for ids, ar, loss in segments:
      end = start + len(ids)
      out[0, start:end] = ids
      out[1, start:end] = ar  # mask_ar
      out[2, start:end] = loss  # mask_loss
      start = end
    return out

  def layout_and_flags(prompts, answers):
    """layout, whether it cut the first turn to fit, whether an answer is
    empty."""
    turns = ids_of(prompts, answers)
    p_ids, a_ids = turns[0]
    kept_prompt = min(len(p_ids), max_len - 1)
    cut = len(p_ids) > kept_prompt or len(a_ids) > max_len - kept_prompt - 1
    empty = any(not _as_str(a).strip() for a in np.atleast_1d(answers))
    return layout(turns), np.bool_(cut), np.bool_(empty)

  def fn(example):
    if tokenizer is None:
      raise PreprocessError("vlm_text needs build(spec, tokenizer=...)")
    texts = [_get(example, prompt_key), _get(example, answer_key)]
    if TRUNCATED_TEXTS not in example:
      out = tf.numpy_function(lambda p, a: layout(ids_of(p, a)), texts, tf.int32,
                              stateful=False)
    else:
      out, cut, empty = tf.numpy_function(
          layout_and_flags, texts, [tf.int32, tf.bool, tf.bool], stateful=False)
      out = _reject_empty_text(example, "vlm_text", answer_key, empty, out)
      example = dict(example)
      _count(example, TRUNCATED_TEXTS, cut)
    out.set_shape([4, max_len])
    return {**example, "text": out[0], "mask_ar": out[1], "mask_loss": out[2],
            "input_mask": out[3]}
  return fn


def _as_str(value) -> str:
  """A tf.numpy_function string argument (bytes, or a 0-d array of bytes)."""
  value = np.asarray(value).item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def object_attributes(max_objects=3, inkey="objects") -> Op:
  """"colours" and "shapes": the objects' class ids as int32 [max_objects],
  padded with -1 (for evaluators that check what a caption names)."""
  max_objects = _int("max_objects", max_objects)
  _key("inkey", inkey)

  def fn(example):
    objects = _get(example, inkey)
    out = {}
    for name, attribute in (("colours", "colour"), ("shapes", "shape")):
      ids = tf.cast(_get(objects, attribute), tf.int32)[:max_objects]
      padded = tf.pad(ids, [[0, max_objects - tf.shape(ids)[0]]], constant_values=-1)
      padded.set_shape([max_objects])
      out[name] = padded
    return {**example, **out}
  return fn


def keep(*keys) -> Op:
  """Keeps only the listed keys (each must exist); all others, _seed too, go,
  except a training stream's record counters (COUNT_KEYS)."""
  _keys(keys)
  return lambda example: {
      **{k: v for k, v in example.items() if k.startswith(COUNT_PREFIX)},
      **{k: _get(example, k) for k in keys}}


def drop(*keys) -> Op:
  """Removes the listed keys (each must exist)."""
  _keys(keys)

  def fn(example):
    for k in keys:
      _get(example, k)  # A typo in a dropped key should not pass silently.
    return {k: v for k, v in example.items() if k not in keys}
  return fn


def rename(**new_from_old) -> Op:
  """Renames keys: rename(text="caption") moves example["caption"] to "text"."""
  if not new_from_old:
    raise ValueError('rename needs at least one new="old" pair')
  for old in new_from_old.values():
    _key("old key", old)

  def fn(example):
    moved = {new: _get(example, old) for new, old in new_from_old.items()}
    olds = set(new_from_old.values())
    return {**{k: v for k, v in example.items() if k not in olds}, **moved}
  return fn


def copy(inkey, outkey) -> Op:
  """Copies example[inkey] to example[outkey]."""
  _key("inkey", inkey)
  _key("outkey", outkey)
  return lambda example: {**example, outkey: _get(example, inkey)}


# The op table: a spec's op names are exactly these function names.
OPS: dict[str, Callable[..., Op]] = {f.__name__: f for f in (
    decode, resize, resize_small, central_crop, crop_to_object, random_crop, value_range,
    normalize, flip_lr, choice, tokenize, object_label, object_pair_label, vlm_task,
    vlm_text, object_attributes, keep, drop, rename, copy)}


def _user_signature(factory: Callable) -> inspect.Signature:
  """The factory's signature without the parameters build() supplies."""
  sig = inspect.signature(factory)
  params = [p for p in sig.parameters.values()
            if p.name not in _RESOURCE_PARAMS]
  return sig.replace(parameters=params,
                     return_annotation=inspect.Signature.empty)


def describe_ops() -> str:
  """One line per op: its signature and the first line of its docstring."""
  lines = []
  for name, factory in OPS.items():
    doc = (inspect.getdoc(factory) or "").splitlines()
    lines.append(f"  {name}{_user_signature(factory)}: {doc[0] if doc else ''}")
  return "\n".join(lines)


# --- Parsing. A spec is a Python expression: `a|b(1)` is a chain of BitOr
# nodes, so ast gives us quoting, nesting and error positions for free.

def _flatten(node: ast.AST) -> list[ast.AST]:
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _flatten(node.left) + _flatten(node.right)
  return [node]


def _literal(node: ast.AST, what: str, op: str, spec: str):
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    hint = " (strings need quotes)" if isinstance(node, ast.Name) else ""
    raise PreprocessError(
        f"op {op!r}: {what} must be a Python literal, got "
        f"`{ast.unparse(node)}`{hint}; in spec {spec!r}") from None


def _parse_op(node: ast.AST, spec: str) -> OpCall:
  if isinstance(node, ast.Name):
    return OpCall(node.id)
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PreprocessError(f"malformed op `{ast.unparse(node)}`: expected "
                          f"`name` or `name(args)`; in spec {spec!r}")
  name = node.func.id
  if any(isinstance(a, ast.Starred) for a in node.args) or any(
      kw.arg is None for kw in node.keywords):
    raise PreprocessError(f"op {name!r}: *args/**kwargs are not allowed; "
                          f"in spec {spec!r}")
  args = tuple(_literal(a, f"argument {i + 1}", name, spec)
               for i, a in enumerate(node.args))
  kwargs = {kw.arg: _literal(kw.value, f"argument {kw.arg}=", name, spec)
            for kw in node.keywords}
  return OpCall(name, args, kwargs)


def _validate(call: OpCall, spec: str) -> None:
  factory = OPS.get(call.name)
  if factory is None:
    close = difflib.get_close_matches(call.name, OPS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise PreprocessError(
        f"unknown preprocessing op {call.name!r} in spec {spec!r}.{hint}\n"
        f"Valid ops:\n{describe_ops()}")
  sig = _user_signature(factory)
  try:
    sig.bind(*call.args, **call.kwargs)
  except TypeError as e:
    raise PreprocessError(f"op `{call}` does not fit {call.name}{sig}: {e}; "
                          f"in spec {spec!r}") from None
  try:
    factory(*call.args, **call.kwargs)  # Only pure-Python argument checks.
  except (TypeError, ValueError) as e:
    raise PreprocessError(f"op `{call}`: {e}; in spec {spec!r}") from None


def parse(spec: str) -> list[OpCall]:
  """Parses and checks a spec without running anything; PreprocessError if bad."""
  if not isinstance(spec, str) or not spec.strip():
    raise PreprocessError(f"a preprocessing spec must be a non-empty string, "
                          f"got {spec!r}")
  # Newlines are only layout in a spec, but would end a Python expression.
  source = spec.replace("\n", " ").strip()
  try:
    tree = ast.parse(source, mode="eval")
  except SyntaxError as e:
    where = f" near column {e.offset}" if e.offset else ""
    raise PreprocessError(
        f"bad syntax in preprocessing spec {spec!r}{where}: {e.msg}") from None
  calls = [_parse_op(node, spec) for node in _flatten(tree.body)]
  for call in calls:
    _validate(call, spec)
  return calls


def build(spec: str, *, tokenizer=None) -> Op:
  """Builds fn(example) -> example from a spec, for tf.data.Dataset.map."""
  calls = parse(spec)
  fns = []
  for call in calls:
    factory = OPS[call.name]
    resources = {}
    if "tokenizer" in inspect.signature(factory).parameters:
      if tokenizer is None:
        raise PreprocessError(
            f"spec {spec!r} uses `{call.name}`, which needs a tokenizer: "
            "call build(spec, tokenizer=...)")
      resources["tokenizer"] = tokenizer
    fns.append(factory(*call.args, **call.kwargs, **resources))

  # The ops are plain TF code: AutoGraph would only slow tracing down and
  # wrap our PreprocessErrors in its StagingError.
  @tf.autograph.experimental.do_not_convert
  def preprocess(example: Mapping[str, Any]) -> dict:
    example = dict(example)
    base_seed = example.get(SEED_KEY)
    for i, (call, fn) in enumerate(zip(calls, fns)):
      if base_seed is not None and SEED_KEY in example:
        # Each position in the chain gets its own stream of randomness.
        example[SEED_KEY] = tf.random.experimental.stateless_fold_in(
            base_seed, i)
      try:
        example = dict(fn(example))
      except PreprocessError as e:
        raise PreprocessError(
            f"op #{i} `{call}` of spec {spec!r}: {e}") from None
      if base_seed is not None and SEED_KEY in example:
        example[SEED_KEY] = base_seed
    return example

  preprocess.spec = spec
  return preprocess
