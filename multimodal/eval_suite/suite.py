"""The benchmark tasks, CLIP_benchmark's three, on any Encoder and Benchmark:

  zeroshot_classification  acc1, acc5, mean_per_class_recall against the
                           prompt-ensembled class embeddings (cached on disk);
  zeroshot_retrieval       image_retrieval_recall@k (text -> image) and
                           text_retrieval_recall@k (image -> text), an image
                           being found by any of its captions;
  linear_probe             lp_acc1, lp_acc5, lp_mean_per_class_recall of a
                           logistic regression on frozen features, its weight
                           decay chosen on a validation split.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from multimodal.data import errors
from multimodal.eval_suite import datasets
from multimodal.eval_suite.embedding import Timing, embed_split
from multimodal.eval_suite.encoders import Encoder
from multimodal.evaluators import common, linear_probe, metrics, zero_shot

ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"
LINEAR_PROBE = "linear_probe"
TASKS = (ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, LINEAR_PROBE)
# Which tasks a dataset kind supports; "auto" runs the first.
TASKS_OF_KIND = {datasets.CLASSIFICATION: (ZEROSHOT_CLASSIFICATION, LINEAR_PROBE),
                 datasets.RETRIEVAL: (ZEROSHOT_RETRIEVAL,)}


def default_cache_dir() -> str:
  return os.environ.get("MULTIMODAL_CACHE") or os.path.expanduser("~/.cache/multimodal")


def text_classifier(encoder: Encoder, class_names, templates,
                    cache_dir: str | None) -> np.ndarray:
  """[classes, D] class embeddings, computed once per (weights, names,
  templates) and kept as .npy under cache_dir/text_classifiers."""
  key = hashlib.sha256(json.dumps(
      [encoder.fingerprint, list(class_names), list(templates)]).encode()).hexdigest()
  path = (os.path.join(cache_dir, "text_classifiers", f"{key[:32]}.npy")
          if cache_dir else None)
  if path and os.path.exists(path):
    return np.load(path, allow_pickle=False)
  classifier = zero_shot.class_embeddings(class_names, templates, encoder.embed_texts)
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # A file object: np.save would append ".npy".
      np.save(f, classifier, allow_pickle=False)
    os.replace(tmp, path)  # Atomic: a crash never leaves half a classifier.
  return classifier


def _features(encoder, bench, split, batch_size, memo: dict | None
              ) -> tuple[dict, list[Timing]]:
  """Labelled image embeddings of a split, reused through `memo` (one per
  dataset) when zero-shot and the linear probe both need the test split."""
  if memo is not None and split in memo:
    return memo[split], []
  out, timing = embed_split(encoder, bench.read(split), batch_size=batch_size,
                            num_examples=bench.num_examples(split),
                            extra_pp=bench.label_pp, keys=("label",),
                            what=f"{bench.name}[{split}]")
  if memo is not None:
    memo[split] = out
  return out, [timing]


def zeroshot_classification(encoder: Encoder, bench: datasets.Benchmark, *,
                            split, batch_size: int, cache_dir: str | None,
                            templates=None, memo: dict | None = None, **unused
                            ) -> tuple[dict, list[Timing]]:
  del unused
  out, timings = _features(encoder, bench, split, batch_size, memo)
  classifier = text_classifier(encoder, bench.class_names,
                               templates or bench.templates, cache_dir)
  return metrics.classification_metrics(out["embedding"] @ classifier.T,
                                        out["label"]), timings


def zeroshot_retrieval(encoder: Encoder, bench: datasets.Benchmark, *, split,
                       batch_size: int, **unused) -> tuple[dict, list[Timing]]:
  del unused
  out, timing = embed_split(encoder, bench.read(split), batch_size=batch_size,
                            num_examples=bench.num_examples(split),
                            what=f"{bench.name}[{split}]")
  captions = bench.captions(split)
  if len(captions) != len(out["embedding"]):
    raise errors.DataError(f"{bench.name}: {len(captions)} caption rows for "
                           f"{len(out['embedding'])} images.")
  texts = [c for row in captions for c in row]
  text_to_image = np.repeat(np.arange(len(captions)), [len(row) for row in captions])
  ztxt = common.normalise(encoder.embed_texts(texts))
  recalls = metrics.retrieval_metrics(out["embedding"] @ ztxt.T, text_to_image)
  # CLIP_benchmark's names: "image retrieval" finds the image for a text.
  renamed = {}
  for which, direction in (("image", "text_to_image"), ("text", "image_to_text")):
    for key, value in recalls.items():
      if key.startswith(direction):
        renamed[f"{which}_retrieval_recall@{key.rpartition('@')[2]}"] = value
  return renamed, [timing]


def run_linear_probe(encoder: Encoder, bench: datasets.Benchmark, *, split,
                     batch_size: int, memo: dict | None = None, **unused
                     ) -> tuple[dict, list[Timing]]:
  del unused
  if not bench.has_split("train"):
    raise errors.DataError(
        f"{bench.name} has no 'train' split for the linear probe to fit on"
        + (" (a folder needs PATH/train/<class>/ and PATH/test/<class>/)."
           if bench.name.startswith("folder:") else "."))
  train, timings = _features(encoder, bench, "train", batch_size, memo)
  test, more = _features(encoder, bench, split, batch_size, memo)
  timings += more
  val_x = val_y = None
  if bench.has_split("validation") and split != "validation":
    val, more = _features(encoder, bench, "validation", batch_size, memo)
    val_x, val_y, timings = val["embedding"], val["label"], timings + more
  result = linear_probe.linear_probe(
      train["embedding"], train["label"], test["embedding"], test["label"],
      len(bench.class_names), val_x=val_x, val_y=val_y)
  return result, timings


RUNNERS = {ZEROSHOT_CLASSIFICATION: zeroshot_classification,
           ZEROSHOT_RETRIEVAL: zeroshot_retrieval,
           LINEAR_PROBE: run_linear_probe}


def tasks_for(bench: datasets.Benchmark, requested: list[str]) -> list[str]:
  """The requested tasks this benchmark supports ("auto": its zero-shot one)."""
  supported = TASKS_OF_KIND[bench.kind]
  if requested == ["auto"]:
    return [supported[0]]
  unknown = [t for t in requested if t not in TASKS]
  if unknown:
    raise errors.DataError(f"unknown task(s) {unknown}; tasks are {list(TASKS)} or 'auto'.")
  return [t for t in requested if t in supported]
