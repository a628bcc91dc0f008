"""Embedding a whole split of images, in split order, with a timing line.

The input pipeline (decode + the encoder's pp on tf.data threads) runs ahead
of the jitted forward pass in a background thread; `Timing` separates the
time the loop spent waiting for input from the rest, which is the evidence
for whether an evaluation is bound by the model or by its input.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import tensorflow as tf

from multimodal.data import pipeline, preprocess
from multimodal.eval_suite.encoders import Encoder
from multimodal.evaluators import common
from multimodal.parallel import sharding


@dataclasses.dataclass
class Timing:
  examples: int
  seconds: float
  input_wait_seconds: float

  def line(self, what: str) -> str:
    rate = self.examples / max(self.seconds, 1e-9)
    share = self.input_wait_seconds / max(self.seconds, 1e-9)
    return (f"{what}: {self.examples} images in {self.seconds:.1f} s "
            f"({rate:.0f} images/s); waiting for input {self.input_wait_seconds:.1f} s "
            f"({share:.0%}), the rest is the model's forward pass and transfers")


def embed_split(encoder: Encoder, ds: tf.data.Dataset, *, batch_size: int,
                num_examples: int | None = None, extra_pp: str | None = None,
                keys: tuple[str, ...] = (), what: str = "images"
                ) -> tuple[dict[str, np.ndarray], Timing]:
  """Embeds every raw example of `ds` ({"image": encoded bytes, ...}).

  Returns {"embedding": [N, D] unit rows, **keys: [N] values} in the order
  of `ds`, and the timing. `extra_pp` runs before the image pp, e.g. to
  derive a "label" key from the raw example.
  """
  spec = encoder.image_pp if not extra_pp else f"{extra_pp}|{encoder.image_pp}"
  pp = preprocess.build(spec)

  def pp_fn(example):
    out = pp(example)
    return {"image": out["image"], **{k: out[k] for k in keys}}

  if jax.process_count() > 1 and num_examples is None:
    # Every process must yield as many batches (see indexed_eval_dataset):
    # count the raw records once, which decodes nothing.
    num_examples = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  dp = sharding.data_parallel_size(encoder.mesh)
  batch_size = -(-batch_size // dp) * dp  # Whole rows per device.
  local = pipeline.indexed_eval_dataset(
      ds, pp_fn=pp_fn, local_batch_size=batch_size // jax.process_count(),
      num_examples=num_examples, process_index=jax.process_index(),
      process_count=jax.process_count())
  batches = pipeline.iterate_global(local, sharding.batch_sharding(encoder.mesh),
                                    what=what)
  start = time.perf_counter()
  waited = 0.0
  outputs = []
  with sharding.mesh_context(encoder.mesh):
    while True:
      before = time.perf_counter()
      batch = next(batches, None)
      waited += time.perf_counter() - before
      if batch is None:
        break
      # Dispatch is asynchronous: the forward pass of this batch overlaps
      # the wait for the next one; results are fetched once at the end.
      outputs.append((encoder.embed_image_batch(batch["image"]), batch))
  rows: dict[str, list] = {}
  for z, batch in outputs:
    mask = common.to_host(batch["_mask"]).astype(bool)
    for key, value in (("embedding", z), ("_index", batch["_index"]),
                       *((k, batch[k]) for k in keys)):
      rows.setdefault(key, []).append(common.to_host(value)[mask])
  seconds = time.perf_counter() - start
  if not rows:
    raise ValueError(f"{what}: the split yielded no images.")
  result = {key: np.concatenate(parts) for key, parts in rows.items()}
  order = np.argsort(result.pop("_index"), kind="stable")
  result = {key: value[order] for key, value in result.items()}
  result["embedding"] = common.normalise(result["embedding"].astype(np.float32))
  return result, Timing(len(order), seconds, waited)
