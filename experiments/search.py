"""`./launch.sh search --index FILE.npz (--text "a red circle" | --image PATH) [--k 5]`

Embeds the query with the model that wrote the index and prints the nearest
images and texts of the index, with their cosine similarities.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from experiments import flags_cli
from experiments.common import fail, user_errors

INDEX = flags.DEFINE_string("index", None, "An index written by ./launch.sh embed.")
TEXT = flags.DEFINE_string("text", None, "A text query.")
IMAGE = flags.DEFINE_string("image", None, "An image query (a file path).")
K = flags.DEFINE_integer("k", 5, "How many results per kind.")


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  if not INDEX.value:
    fail("give --index FILE.npz (written by ./launch.sh embed).")
  if (TEXT.value is None) == (IMAGE.value is None):
    fail('give exactly one query: --text "..." or --image PATH.')
  from multimodal.data import errors
  from multimodal.eval_suite import encoders, index
  try:
    data = index.load(INDEX.value)
    made_by = data["encoder"]
    encoder = encoders.load(workdir=made_by["workdir"], hf=made_by["hf"])
    if TEXT.value is not None:
      query = encoder.embed_texts([TEXT.value])[0]
    else:
      if not os.path.isfile(IMAGE.value):
        raise errors.DataError(f"--image {IMAGE.value} does not exist.")
      query = index.embed_images(encoder, [os.path.abspath(IMAGE.value)])[0][0]
  except user_errors() as e:
    fail(str(e))
  for kind, items, embeddings in (("images", data["image_paths"], data["image_embeddings"]),
                                  ("texts", data["texts"], data["text_embeddings"])):
    hits = index.nearest(query, embeddings, K.value)
    if hits:
      print(f"Nearest {kind}:")
      for row, score in hits:
        print(f"  {score:.4f}  {items[row]}")


if __name__ == "__main__":
  main(sys.argv)
