"""Data problems end in a DataError that names the problem and the fix."""
import numpy as np
import pytest
import tensorflow as tf

from multimodal.data import errors, pipeline, preprocess, sources
from multimodal.parallel import sharding

pytestmark = pytest.mark.unit


def _record(image_bytes, caption):
  return tf.train.Example(features=tf.train.Features(feature={
      "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
  })).SerializeToString()


def _write_shard(path, records):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in records:
      writer.write(record)


def test_img2dataset_tfrecords_are_read(tmp_path):
  image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
  jpeg = tf.io.encode_jpeg(image).numpy()
  _write_shard(tmp_path / "00000.tfrecord", [_record(jpeg, f"caption {i}") for i in range(4)])
  source = sources.open_source(f"tfrecord:{tmp_path}/*.tfrecord")
  pp = preprocess.build('decode|resize(8)|keep("image", "captions")')
  ds = pipeline.eval_dataset(source, split="train", pp_fn=pp, local_batch_size=8)
  batch = next(pipeline.iterate_global(ds, sharding.batch_sharding(
      sharding.make_mesh({"data": -1})), what="shards"))
  assert batch["image"].shape == (8, 8, 8, 3)
  assert np.asarray(batch["_mask"]).sum() == 4
  assert np.asarray(batch["captions"])[3, 0] == b"caption 3"


def test_undecodable_image_record_is_a_clear_error(tmp_path):
  image = np.zeros((16, 16, 3), np.uint8)
  good = _record(tf.io.encode_png(image).numpy(), "fine")
  bad = _record(b"\x89PNG but truncated garbage", "broken")
  _write_shard(tmp_path / "00000.tfrecord", [good, bad, good])
  source = sources.open_source(f"tfrecord:{tmp_path}/*.tfrecord")
  pp = preprocess.build('decode|resize(8)|keep("image")')
  ds = pipeline.eval_dataset(source, split="train", pp_fn=pp, local_batch_size=8)
  mesh = sharding.make_mesh({"data": -1})
  with pytest.raises(errors.DataError, match="corrupt") as info:
    list(pipeline.iterate_global(ds, sharding.batch_sharding(mesh), what="my shards"))
  assert "my shards" in str(info.value)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(errors.DataError, match="tfds build mnist"):
    sources.open_source("mnist", data_dir=str(tmp_path))


def test_no_matching_shards(tmp_path):
  with pytest.raises(errors.DataError, match="no TFRecord shards"):
    sources.open_source(f"tfrecord:{tmp_path}/*.tfrecord")


def test_unknown_split_is_named(data_dir):
  from conftest import TINY_WORLD
  source = sources.open_source("shapes_world", data_dir=data_dir, shapes_world=TINY_WORLD)
  with pytest.raises(errors.DataError, match="test_novel"):
    source.read("tset")
