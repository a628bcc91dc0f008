"""Bad training records: each kind is converted, cut or skipped, and counted;
too many skipped stop the run; an all-bad dataset fails at once; a resumed
stream continues exactly, bad records or not."""
import json
import threading

import jax
import numpy as np
import pytest
import tensorflow as tf

from multimodal.data import errors, pipeline, preprocess, sources, tokenizer as tokenizer_lib
from multimodal.parallel import sharding

pytestmark = pytest.mark.unit

PP = ('decode|resize(8)|flip_lr|choice("captions", "text")|tokenize(16, "text")'
      '|keep("image", "tokens")')
LONG = " ".join(["red circle blue square"] * 10)  # Far over 15 tokens.
TWO_SHARDS = pipeline.Shards((0, 1), 2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [f"a {c} {s} left of a {s}" for c in ("red", "blue", "green")
           for s in ("circle", "square", "star")] * 20 + [LONG]
  path = tmp_path_factory.mktemp("spm") / "t.model"
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(texts, str(path), 64))


@pytest.fixture(scope="module")
def pp(tokenizer):
  return preprocess.build(PP, tokenizer=tokenizer)


def _pixels(channels=3, dtype=np.uint8, seed=0):
  high = 256 if dtype == np.uint8 else 65536
  return np.random.default_rng(seed).integers(0, high, (8, 8, channels)).astype(dtype)


def png(channels=3, dtype=np.uint8, seed=0):
  return tf.io.encode_png(_pixels(channels, dtype, seed)).numpy()


def jpeg(channels=3, seed=0):
  return tf.io.encode_jpeg(_pixels(channels, seed=seed)).numpy()


def _record(image_bytes, caption):
  return tf.train.Example(features=tf.train.Features(feature={
      "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
  })).SerializeToString()


def _source(directory, *files):
  """A tfrecord: source of one shard file per list of (image, caption)."""
  directory.mkdir(exist_ok=True)
  for i, records in enumerate(files):
    with tf.io.TFRecordWriter(str(directory / f"{i:05d}.tfrecord")) as writer:
      for image, caption in records:
        writer.write(_record(image, caption))
  return sources.open_source(f"tfrecord:{directory}/*.tfrecord")


def _good(n, seed=0):
  return [(png(seed=seed + i), f"a red circle left of a star {i % 3}") for i in range(n)]


def _with_bad(n, seed=0):
  """n records, every third undecodable or with an empty caption."""
  records = _good(n, seed)
  for i in range(1, n, 3):
    records[i] = (b"not an image", "a red star") if i % 2 else (png(seed=i), " \t")
  return records


def _train(source, pp, *, shards=TWO_SHARDS, batch=4, buffer=8, **kwargs):
  ds = pipeline.train_dataset(source, split="train", pp_fn=pp, local_batch_size=batch,
                              seed=3, shuffle_buffer=buffer, shards=shards, **kwargs)
  return ds.as_numpy_iterator()


# --- Handled: converted images, cut captions. -------------------------------

def _decode(value, counting):
  example = {"image": tf.constant(value)}
  if counting:
    example[preprocess.CONVERTED_IMAGES] = tf.constant(0)
  out = preprocess.decode()(example)
  return out["image"].numpy(), int(out.get(preprocess.CONVERTED_IMAGES, -1))


def test_decode_converts_grey_rgba_and_16_bit_images_to_rgb_and_counts_them():
  grey, rgba = _pixels(1), _pixels(4)
  deep = _pixels(3, np.uint16)
  cases = {  # bytes: (expected RGB uint8, converted)
      png(): (_pixels(3), 0),
      png(1): (np.repeat(grey, 3, -1), 1),
      png(4): (rgba[..., :3], 1),
      png(2): (np.repeat(_pixels(2)[..., :1], 3, -1), 1),  # Grey + alpha.
      png(3, np.uint16): ((deep >> 8).astype(np.uint8), 1),
      jpeg(1): (None, 1),
      jpeg(3): (None, 0),
  }
  for value, (want, converted) in cases.items():
    image, count = _decode(value, counting=True)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    if want is not None:
      np.testing.assert_array_equal(image, want)
    assert count == converted
    # Evaluation decodes the same pixels and counts nothing.
    eval_image, eval_count = _decode(value, counting=False)
    np.testing.assert_array_equal(eval_image, image)
    assert eval_count == -1
  # 16-bit values are scaled (v >> 8: within 1 of round(v / 257)), not wrapped.
  image, _ = _decode(png(3, np.uint16), counting=True)
  assert np.abs(image.astype(int) - np.round(deep / 257)).max() <= 1
  # A jpeg's grey channel is copied to all three.
  image, _ = _decode(jpeg(1), counting=True)
  assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()


def test_tokenize_cuts_and_counts_long_captions_and_rejects_empty_ones_in_training(tokenizer):
  op = preprocess.tokenize(16, tokenizer=tokenizer)

  def run(text, counting):
    example = {"text": tf.constant(text)}
    if counting:
      example.update({k: tf.constant(0) for k in preprocess.COUNT_KEYS})
    out = op(example)
    return out["tokens"].numpy(), int(out.get(preprocess.TRUNCATED_TEXTS, -1))

  for text, cut in (("a red circle", 0), (LONG, 1)):
    tokens, count = run(text, counting=True)
    np.testing.assert_array_equal(tokens, run(text, counting=False)[0])
    assert count == cut
    assert tokens[-1] == (tokenizer.eos_id if cut else tokenizer.pad_id)
  for empty in ("", "  \t", "\u3000"):
    with pytest.raises(tf.errors.InvalidArgumentError, match="tokenize: the text in 'text' is empty"):
      run(empty, counting=True)
    # Evaluation keeps every record: an empty caption is just EOS.
    tokens, _ = run(empty, counting=False)
    assert tokens[0] == tokenizer.eos_id and not tokens[1:].any()


def test_vlm_text_counts_cut_texts_and_rejects_empty_answers_in_training(tokenizer):
  op = preprocess.vlm_text(12, tokenizer=tokenizer)

  def run(prompt, answer, counting):
    example = {"prompt": tf.constant(prompt), "answer": tf.constant(answer)}
    if counting:
      example.update({k: tf.constant(0) for k in preprocess.COUNT_KEYS})
    out = op(example)
    return out["text"].numpy(), int(out.get(preprocess.TRUNCATED_TEXTS, -1))

  n_prompt = int(np.argmax(tokenizer.encode("caption", 12)[0] == tokenizer.eos_id))
  fits = "a red circle"
  n_fits = int(np.argmax(tokenizer.encode(fits, 12)[0] == tokenizer.eos_id))
  assert n_prompt + n_fits + 1 <= 12
  for prompt, answer, cut in (("caption", fits, 0), ("caption", LONG, 1), (LONG, fits, 1)):
    text, count = run(prompt, answer, counting=True)
    np.testing.assert_array_equal(text, run(prompt, answer, counting=False)[0])
    assert count == cut, (prompt, answer)
  with pytest.raises(tf.errors.InvalidArgumentError, match="vlm_text: the text in 'answer' is empty"):
    run("caption", " ", counting=True)
  assert run("caption", " ", counting=False)[1] == -1


def test_keep_keeps_the_training_counters_only_where_they_are():
  example = {"image": tf.zeros([2]), "other": tf.zeros([1]),
             preprocess.CONVERTED_IMAGES: tf.constant(1)}
  assert set(preprocess.keep("image")(example)) == {"image", preprocess.CONVERTED_IMAGES}
  del example[preprocess.CONVERTED_IMAGES]
  assert set(preprocess.keep("image")(example)) == {"image"}


# --- Skipped, and counted, in the training stream. --------------------------

def test_each_bad_record_is_handled_or_skipped_and_counted(tmp_path, pp):
  kinds = [
      (png(), "a red circle", "good"),
      (b"\x89PNG truncated garbage", "a red circle", "skip"),
      (png(1), "a red circle", "converted"),
      (png(4), "a blue star", "converted"),
      (png(3, np.uint16), "a red circle", "converted"),
      (jpeg(1), "a red circle", "converted"),
      (png(), "", "skip"),
      (png(), "   ", "skip"),
      (png(), LONG, "truncated"),
      (jpeg(), "a green square", "good"),
  ]
  source = _source(tmp_path / "d", [(image, caption) for image, caption, _ in kinds])
  shards = pipeline.Shards((0,), 1)
  # Buffer 1: the stream is the records in order, over and over.
  batches = _train(source, pp, shards=shards, batch=2, buffer=1)
  tracker = pipeline.StreamTracker.restore(None, shards, 2)
  indices = []
  for _ in range(8):  # 16 examples: two passes over the 7 usable records, and 2.
    batch = next(batches)
    indices += batch[pipeline.STREAM_INDEX].tolist()
    batch = tracker.observe(batch)
    assert set(batch) == {"image", "tokens"}
  usable = [i for i, (_, _, kind) in enumerate(kinds) if kind != "skip"]
  assert indices == [i + 10 * p for p in range(3) for i in usable][:16]
  metrics = tracker.metrics()
  assert metrics["data/records_read"] == indices[-1] + 1 == 23
  assert metrics["data/skipped_records"] == 23 - 16 == 7  # 3 bad of 10, twice, and 1.
  assert metrics["data/converted_images"] == 4 + 4 + 1  # Records 0 and 2 last.
  assert metrics["data/truncated_captions"] == 2
  assert metrics["data/skipped_fraction"] == pytest.approx(7 / 23)


def test_a_shard_without_a_usable_record_fails_at_once_naming_the_error(tmp_path, pp):
  def build(source, shards):
    result = {}

    def target():
      try:
        _train(source, pp, shards=shards)
      except Exception as e:  # noqa: BLE001 - handed to the test thread.
        result["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "building an all-bad training stream hung"
    return result.get("error")

  undecodable = _source(tmp_path / "a", [(b"junk", "a red circle")] * 5)
  error = build(undecodable, pipeline.Shards((0,), 1))
  assert isinstance(error, errors.DataError)
  assert "none of the 5 records of shard 0 of 1" in str(error)
  assert "Unknown image file format" in str(error)

  empty_captions = _source(tmp_path / "b", _good(3), [(png(), "")] * 4)
  error = build(empty_captions, TWO_SHARDS)
  assert isinstance(error, errors.DataError)
  assert "shard 1 of 2" in str(error) and "is empty" in str(error)


def test_a_corrupt_shard_file_still_stops_training(tmp_path, pp):
  """Only records whose pp fails are skipped, not errors reading the shards."""
  source = _source(tmp_path / "d", _good(20))
  path = tmp_path / "d" / "00000.tfrecord"
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = b"x" * 16  # A record that fails its checksum.
  path.write_bytes(bytes(data))
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  ds = pipeline.train_dataset(source, split="train", pp_fn=pp, local_batch_size=4,
                              seed=0, shuffle_buffer=1)
  batches = pipeline.iterate_global(ds, sharding.batch_sharding(mesh), what="my shards")
  with pytest.raises(errors.DataError, match="reading my shards failed: .*corrupted record"):
    for _ in range(10):  # The 20 records, and a few more: the error comes first.
      next(batches)


def test_too_many_skipped_records_stop_the_run_with_a_clear_error(tmp_path, pp):
  source = _source(tmp_path / "d", _with_bad(30))
  shards = pipeline.Shards((0,), 1)
  batches = _train(source, pp, shards=shards, batch=4)
  tracker = pipeline.StreamTracker.restore(None, shards, 4)
  tracker.observe(next(batches))
  tracker.check(0.01)  # 1 or 2 skipped: under the limit, of 1,000 records.
  for _ in range(6):
    tracker.observe(next(batches))
  tracker.check(0.5)
  with pytest.raises(errors.DataError) as info:
    tracker.check(0.01)
  metrics = tracker.metrics()
  skipped, read = metrics["data/skipped_records"], metrics["data/records_read"]
  assert 10 < skipped and read == skipped + 28
  message = str(info.value)
  for part in (f"{skipped:,} of the {read:,} training records", "max_skipped_fraction=0.01",
               "--config.input.max_skipped_fraction", "1,000"):
    assert part in message
  with pytest.raises(ValueError, match="max_skipped_fraction"):
    tracker.check(1.5)


def _observe(tracker, indices, counts=0):
  rows = np.asarray(indices)
  return tracker.observe({pipeline.STREAM_INDEX: rows, "image": np.zeros((len(rows), 2)),
                          preprocess.CONVERTED_IMAGES: np.full(len(rows), counts, np.int32)})


def test_the_skip_limit_is_a_fraction_of_at_least_1000_records():
  shards = pipeline.Shards((0,), 1)
  tracker = pipeline.StreamTracker.restore(None, shards, 10)
  _observe(tracker, list(range(10, 20)))  # The first 10 records skipped.
  tracker.check(0.01)  # 10 / 1,000: not over.
  _observe(tracker, [20, *range(22, 31)])  # And one more: 11 of 31.
  with pytest.raises(errors.DataError, match="11 of the 31 training records"):
    tracker.check(0.01)
  tracker.check(0.011)
  assert tracker.metrics()["data/skipped_records"] == 11


# --- Exact resumption. ------------------------------------------------------

def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("bad", [False, True])
def test_a_resumed_stream_continues_exactly(tmp_path, pp, bad):
  make = _with_bad if bad else _good
  source = _source(tmp_path / "d", make(13), make(11, seed=50))
  straight = _train(source, pp)
  tracker = pipeline.StreamTracker.restore(None, TWO_SHARDS, 4)
  saved = None
  want = []
  for step in range(1, 9):
    batch = next(straight)
    tracker.observe(dict(batch))
    if step == 3:
      saved = json.loads(json.dumps(tracker.to_json()))
    if step > 3:
      want.append(batch)

  resumed_tracker = pipeline.StreamTracker.restore(saved, TWO_SHARDS, 4)
  start = resumed_tracker.start_positions()
  resumed = _train(source, pp, start_positions=start)
  got = [next(resumed) for _ in range(5)]
  _assert_same_batches(got, want)
  for batch in got:
    resumed_tracker.observe(dict(batch))
  assert resumed_tracker.metrics() == tracker.metrics()
  assert resumed_tracker.to_json() == tracker.to_json()
  skipped = tracker.metrics()["data/skipped_records"]
  assert (skipped > 0) == bad
  if not bad:  # Nothing skipped: the positions are the examples delivered.
    assert start == (6, 6)


def _old_train_dataset(source, *, pp_fn, local_batch_size, seed, start_example,
                       shuffle_buffer, shards):
  """train_dataset before records could be skipped: the reference order."""
  rows = local_batch_size // len(shards.indices)
  global_batch = rows * shards.count

  def stream(shard):
    ds = source.read("train", process_index=shard, process_count=shards.count)
    ds = ds.repeat().shuffle(max(1, shuffle_buffer // shards.count),
                             seed=seed + shard, reshuffle_each_iteration=True)
    ds = ds.enumerate().map(lambda i, example: (
        i // rows * global_batch + shard * rows + i % rows, example))
    ds = ds.map(pipeline._with_example_seed(seed))
    return ds.skip(start_example // len(shards.indices))

  streams = [stream(shard) for shard in shards.indices]
  order = tf.data.Dataset.range(len(streams)).flat_map(
      lambda s: tf.data.Dataset.from_tensors(s).repeat(rows))
  ds = tf.data.Dataset.choose_from_datasets(streams, order.repeat())
  ds = ds.map(pp_fn).batch(local_batch_size, drop_remainder=True)
  return ds.as_numpy_iterator()


def test_without_bad_records_the_batches_are_the_ones_from_before(tmp_path, pp):
  source = _source(tmp_path / "d", _good(9), _good(7, seed=20))
  for start_example in (0, 8):
    old = _old_train_dataset(source, pp_fn=pp, local_batch_size=4, seed=3,
                             start_example=start_example, shuffle_buffer=8,
                             shards=TWO_SHARDS)
    new = _train(source, pp, start_positions=[start_example // 2] * 2)
    want = [next(old) for _ in range(6)]
    got = [{k: v for k, v in next(new).items() if not pipeline.is_host_only(k)}
           for _ in range(6)]
    _assert_same_batches(got, want)
  # An old checkpoint's position resumes as it did.
  legacy = pipeline.StreamTracker.restore({"examples_per_process": 8}, TWO_SHARDS, 4)
  assert legacy.start_positions() == (4, 4)
  assert legacy.metrics()["data/records_read"] == 8
  assert legacy.metrics()["data/skipped_records"] == 0


def test_positions_of_every_process_are_gathered_into_the_checkpoint(monkeypatch):
  """Two processes, one shard each: both save every shard's position."""
  trackers = [pipeline.StreamTracker.restore(None, pipeline.Shards((d,), 2), 2)
              for d in range(2)]
  _observe(trackers[0], [0, 2], counts=1)
  _observe(trackers[1], [0, 1])
  # What process_allgather gives every process: all processes' tables.
  monkeypatch.setattr(pipeline, "_allgather",
                      lambda table: np.stack([t._table for t in trackers]))
  saved = [t.to_json() for t in trackers]
  assert saved[0]["shards"] == saved[1]["shards"] == {
      "count": 2, "positions": [3, 2], "delivered": [2, 2],
      "converted_images": [2, 0], "truncated_captions": [0, 0]}
  merged = trackers[1].metrics()
  assert merged["data/skipped_records"] == 1 and merged["data/records_read"] == 5
  monkeypatch.undo()  # From here on, one process.
  for d in range(2):  # Either process, or a single one, resumes every shard.
    assert pipeline.StreamTracker.restore(
        saved[0], pipeline.Shards((d,), 2), 2).start_positions() == ((3,), (2,))[d]
  assert pipeline.StreamTracker.restore(saved[0], TWO_SHARDS, 4).start_positions() == (3, 2)
  # Another shard count: streams restart at the examples per shard so far,
  # and the counts carry over.
  other = pipeline.StreamTracker.restore(saved[0], pipeline.Shards((0, 1, 2, 3), 4), 4)
  assert other.start_positions() == (1, 1, 1, 1)
  assert other.metrics() == merged


def test_a_batch_from_another_position_is_refused():
  tracker = pipeline.StreamTracker.restore({"examples_per_process": 10}, pipeline.Shards((0,), 1), 2)
  with pytest.raises(errors.DataError, match="start_positions"):
    _observe(tracker, [3, 4])


# --- Host-only columns, and evaluation unchanged. ---------------------------

def test_host_only_columns_stay_numpy_rows_and_eval_batches_do_not_change(tmp_path, pp,
                                                                         tokenizer):
  source = _source(tmp_path / "d", _good(15) + [(png(4), "a red circle")])
  mesh = sharding.make_mesh({"data": -1})
  batch_sharding = sharding.batch_sharding(mesh)
  ds = pipeline.train_dataset(source, split="train", pp_fn=pp, local_batch_size=8,
                              seed=0, shards=pipeline.Shards.of(batch_sharding))
  batch = next(pipeline.iterate_global(ds, batch_sharding, what="train"))
  for key in (pipeline.STREAM_INDEX, *preprocess.COUNT_KEYS):
    assert isinstance(batch[key], np.ndarray) and batch[key].shape == (8,)
  assert isinstance(batch["image"], jax.Array)

  ds = pipeline.eval_dataset(source, split="train", pp_fn=pp, local_batch_size=8)
  batch = next(pipeline.iterate_global(ds, batch_sharding, what="eval"))
  assert set(batch) == {"image", "tokens", "_mask"}
  assert np.asarray(batch["_mask"]).sum() == 8
  eval_pp = preprocess.build('decode|resize(8)|tokenize(16, "captions")|keep("image", "tokens")',
                             tokenizer=tokenizer)
  ds = pipeline.indexed_eval_dataset(source.read("train"), pp_fn=eval_pp, local_batch_size=8)
  assert set(ds.element_spec) == {"image", "tokens", "_index", "_mask"}


def test_every_training_config_sets_the_skip_limit():
  from configs import (clip_shapes, dit_shapes, dit_xl2, shapes_classifier, siglip_shapes,
                       vlm_shapes)
  for module in (clip_shapes, dit_shapes, dit_xl2, shapes_classifier, siglip_shapes, vlm_shapes):
    assert module.get_config().input.max_skipped_fraction == 0.01, module.__name__
