"""Caption quality: are the attributes a caption names really in the image?

BLEU against the reference captions rewards the template wording as much as
the content, and a model that always writes "a photo of a red circle." scores
well on it whatever the image shows. The shapes world knows every object, so
the main figure here checks content instead: each colour and shape word a
caption names must belong to some object of its image (precision), and
object_recall counts how many objects a caption names by shape. BLEU-4 is
reported alongside for comparability with captioning papers.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sacrebleu

from multimodal.data import shapes_world
from multimodal.evaluators import common, vqa

ATTRIBUTES = ("colour", "shape", "size", "position")
_WORD = re.compile(r"[a-z]+")
_COLOURS = frozenset(shapes_world.COLOURS)
_SIZES = frozenset(shapes_world.SIZES)
# Plurals ("two circles", "crosses") name the shape too.
_SHAPES = {**{s + "s": s for s in shapes_world.SHAPES},
           **{s + "es": s for s in shapes_world.SHAPES if s.endswith("s")},
           **{s: s for s in shapes_world.SHAPES}}
_TWO_WORD_POSITIONS = frozenset(p for p in shapes_world.POSITIONS if " " in p)
_ONE_WORD_POSITIONS = {**{p: p for p in shapes_world.POSITIONS if " " not in p},
                       "centre": "center"}


def named_attributes(caption) -> dict[str, list[str]]:
  """The colours, shapes, sizes and positions a caption names, in order.

  Keys are the object attributes of shapes_world ("colour", "shape", "size",
  "position") and values their canonical names, once per mention. Two-word
  positions win over their parts ("in the top left corner" names "top left",
  not "top" and "left"); plurals name their shape; "shape(s)" names nothing.
  """
  words = _WORD.findall(vqa.to_str(caption).lower())
  named = {key: [] for key in ATTRIBUTES}
  i = 0
  while i < len(words):
    pair = " ".join(words[i:i + 2])
    if pair in _TWO_WORD_POSITIONS:
      named["position"].append(pair)
      i += 2
      continue
    word = words[i]
    if word in _COLOURS:
      named["colour"].append(word)
    elif word in _SHAPES:
      named["shape"].append(_SHAPES[word])
    elif word in _SIZES:
      named["size"].append(word)
    elif word in _ONE_WORD_POSITIONS:
      named["position"].append(_ONE_WORD_POSITIONS[word])
    i += 1
  return named


def _ratio(num: int, den: int) -> float:
  # Nothing named scores 0, not NaN: saying nothing must not look good.
  return num / den if den else 0.0


def attribute_accuracy(captions: Sequence[str],
                       objects: Sequence[Sequence[dict]]) -> dict[str, float]:
  """Precision of the attributes named by each caption, pooled over captions.

  Args:
    captions: one generated caption per image.
    objects: per image, its objects as dicts with "colour" and "shape" (and
      optionally "size", "position") names, as in shapes_world.

  Returns:
    attribute_accuracy: correct / named over colour and shape mentions, where
      a caption naming neither a colour nor a shape (e.g. empty) counts as one
      wrong mention, so empty or contentless output scores 0, not 1.
    colour_accuracy, shape_accuracy (and size_accuracy, position_accuracy if
      every object has that key): correct / named for that attribute alone,
      0.0 if no caption names it.
    object_recall: fraction of all objects whose shape their caption names.
    empty_fraction: fraction of captions naming neither colour nor shape.
  """
  if len(captions) != len(objects):
    raise ValueError(f"{len(captions)} captions for {len(objects)} images.")
  if not captions:
    raise ValueError("attribute_accuracy of no captions.")
  keys = [k for k in ATTRIBUTES
          if all(k in o for objs in objects for o in objs)]
  correct = dict.fromkeys(keys, 0)
  named = dict.fromkeys(keys, 0)
  empty = recalled = num_objects = 0
  for caption, objs in zip(captions, objects):
    mentions = named_attributes(caption)
    for key in keys:
      present = {o[key] for o in objs}
      correct[key] += sum(m in present for m in mentions[key])
      named[key] += len(mentions[key])
    empty += not (mentions["colour"] or mentions["shape"])
    recalled += sum(o["shape"] in mentions["shape"] for o in objs)
    num_objects += len(objs)
  main = ("colour", "shape")
  out = {"attribute_accuracy": _ratio(sum(correct[k] for k in main),
                                      sum(named[k] for k in main) + empty)}
  out.update({f"{k}_accuracy": _ratio(correct[k], named[k]) for k in keys})
  out["object_recall"] = _ratio(recalled, num_objects)
  out["empty_fraction"] = empty / len(captions)
  return out


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus BLEU-4 (sacrebleu defaults: 13a tokens, exp smoothing) in [0, 1].

  sacrebleu reports 0..100; this divides by 100 to match the other metrics.
  `references[i]` are image i's references, any number of them: sacrebleu
  takes one stream per reference slot and skips None entries, so shorter
  lists are padded with None (empty strings are dropped first; an empty
  reference would otherwise count as a length-0 reference for brevity).
  """
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} images.")
  if not hypotheses:
    raise ValueError("bleu4 of no hypotheses.")
  refs = [[vqa.to_str(r) for r in rs if vqa.to_str(r)] for rs in references]
  if not all(refs):
    raise ValueError("every image needs at least one non-empty reference.")
  slots = max(len(rs) for rs in refs)
  streams = [[rs[k] if k < len(rs) else None for rs in refs]
             for k in range(slots)]
  hyps = [vqa.to_str(h) for h in hypotheses]
  return sacrebleu.corpus_bleu(hyps, streams).score / 100


def batch_objects(batch: dict, mask: np.ndarray) -> list[list[dict]]:
  """Per real row, its objects as name dicts, from the -1 padded id arrays."""
  columns = {"colour": ("colours", shapes_world.COLOURS),
             "shape": ("shapes", shapes_world.SHAPES),
             "size": ("sizes", shapes_world.SIZES),
             "position": ("positions", shapes_world.POSITIONS)}
  columns = {k: (common.to_host(batch[key])[mask], names)
             for k, (key, names) in columns.items() if key in batch}
  ids = columns["shape"][0]
  return [[{k: names[int(col[row, j])] for k, (col, names) in columns.items()}
           for j in range(ids.shape[1]) if ids[row, j] >= 0]
          for row in range(ids.shape[0])]


@dataclasses.dataclass
class CaptionQuality:
  """Attribute precision, object recall and BLEU-4 of generated captions.

  Batches (numpy or global arrays, leading axis = rows):
    image: whatever `caption_fn` needs, e.g. [B, H, W, 3].
    captions: [B, K] bytes/str references, b"" where an image has fewer.
    colours, shapes: [B, MAX_OBJECTS] int ids into shapes_world.COLOURS and
      SHAPES, -1 where an image has fewer objects (padding is read from
      shapes; colours must be padded alike).
    sizes, positions (optional): likewise, ids into SIZES and POSITIONS; when
      present, size_accuracy and position_accuracy are reported too.
    _mask: [B] bool, False on padding rows.
  `caption_fn(params, batch)` returns one caption per row, padding rows
  included (theirs are ignored). Single process only: the string columns are
  per-process numpy rows, matched to the mask row for row.

  Returns attribute_accuracy's metrics and "bleu4" (in [0, 1]).
  """
  name: str
  batches: Callable[[], Iterable[dict]]
  caption_fn: Callable  # (params, batch) -> list[str], one per row.

  def run(self, params) -> dict:
    captions, references, objects = [], [], []
    for batch in self.batches():
      captions += vqa.real_rows(batch, self.caption_fn(params, batch),
                                "caption_fn")
      references += vqa.real_rows(batch, np.asarray(batch["captions"]),
                                  "captions")
      objects += batch_objects(batch,
                               common.to_host(batch["_mask"]).astype(bool))
    if not captions:
      raise ValueError("the evaluation split yielded no examples.")
    captions = [vqa.to_str(c) for c in captions]
    out = attribute_accuracy(captions, objects)
    out["bleu4"] = bleu4(captions, references)
    return out
