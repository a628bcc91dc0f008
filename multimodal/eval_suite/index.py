"""An embedding index on disk: what `./launch.sh embed` writes and
`./launch.sh search` reads.

One .npz (no pickle): `image_embeddings` [N, D] with `image_paths` [N],
`text_embeddings` [M, D] with `texts` [M] (rows L2-normalised), and
`encoder`, a JSON record of the model that made them, so that a query is
embedded by that same model.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from multimodal.data import errors, files
from multimodal.eval_suite import embedding
from multimodal.eval_suite.encoders import Encoder

EMPTY = np.zeros((0, 0), np.float32)


def image_files(folder: str) -> list[str]:
  """Every image under `folder`, recursively, in sorted order."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise errors.DataError(f"--images {folder} is not a directory.")
  found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                 for name in names if name.lower().endswith(files.IMAGE_EXTENSIONS))
  if not found:
    raise errors.DataError(
        f"--images {folder} holds no images with extensions {files.IMAGE_EXTENSIONS}.")
  return found


def read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise errors.DataError(f"--texts {path} does not exist: give a file with one text per line.")
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise errors.DataError(f"--texts {path} has no non-empty lines.")
  return lines


def embed_images(encoder: Encoder, paths: list[str], *, batch_size: int = 256
                 ) -> tuple[np.ndarray, embedding.Timing]:
  ds = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda path: {"image": tf.io.read_file(path)})
  out, timing = embedding.embed_split(encoder, ds, batch_size=batch_size,
                                      num_examples=len(paths), what="--images")
  return out["embedding"], timing


def save(path: str, encoder_record: dict, *, image_paths=(), image_embeddings=EMPTY,
         texts=(), text_embeddings=EMPTY) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # A file object: savez would otherwise add ".npz".
    np.savez(f, encoder=np.array(json.dumps(encoder_record)),
             image_paths=np.array(list(image_paths), dtype=str),
             image_embeddings=np.asarray(image_embeddings, np.float32),
             texts=np.array(list(texts), dtype=str),
             text_embeddings=np.asarray(text_embeddings, np.float32))


def load(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.DataError(f"--index {path} does not exist; write one with ./launch.sh embed.")
  try:
    with np.load(path, allow_pickle=False) as data:
      index = {key: data[key] for key in data.files}
    index["encoder"] = json.loads(str(index["encoder"]))
  except (ValueError, KeyError, OSError) as e:
    raise errors.DataError(f"--index {path} is not an index written by "
                           f"./launch.sh embed ({type(e).__name__}: {e}).") from None
  return index


def nearest(query: np.ndarray, embeddings: np.ndarray, k: int) -> list[tuple[int, float]]:
  """(row, cosine similarity) of the k rows nearest to a unit `query`."""
  if embeddings.size == 0:
    return []
  scores = embeddings @ query
  top = np.argsort(-scores, kind="stable")[:k]
  return [(int(i), float(scores[i])) for i in top]
