"""`./launch.sh embed (--workdir DIR | --hf PATH) [--images FOLDER] [--texts FILE] --out FILE.npz`

Writes L2-normalised image embeddings (with their file paths) and text
embeddings (with their lines) for `./launch.sh search`.
"""
from __future__ import annotations

import sys

from absl import flags

from experiments import flags_cli
from experiments.common import define_model_flags, fail, user_errors

WORKDIR, HF = define_model_flags()
IMAGES = flags.DEFINE_string("images", None, "A folder of images (searched recursively).")
TEXTS = flags.DEFINE_string("texts", None, "A text file, one text per line.")
OUT = flags.DEFINE_string("out", None, "The index file to write (.npz).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  if not OUT.value:
    fail("give --out FILE.npz, where the index goes.")
  if not (IMAGES.value or TEXTS.value):
    fail("give --images FOLDER, --texts FILE, or both: there is nothing to embed.")
  from multimodal.eval_suite import encoders, index
  try:
    encoder = encoders.load(workdir=WORKDIR.value, hf=HF.value)
    contents = {}
    if IMAGES.value:
      paths = index.image_files(IMAGES.value)
      contents["image_paths"] = paths
      contents["image_embeddings"], timing = index.embed_images(
          encoder, paths, batch_size=BATCH_SIZE.value)
      print(timing.line("embed"))
    if TEXTS.value:
      contents["texts"] = index.read_lines(TEXTS.value)
      contents["text_embeddings"] = encoder.embed_texts(contents["texts"])
  except user_errors() as e:
    fail(str(e))
  index.save(OUT.value, {"workdir": WORKDIR.value, "hf": HF.value,
                         "model": encoder.model, "pretrained": encoder.pretrained},
             **contents)
  print(f"Wrote {len(contents.get('image_paths', []))} image and "
        f"{len(contents.get('texts', []))} text embeddings to {OUT.value}.")


if __name__ == "__main__":
  main(sys.argv)
