"""Visual question answering: exact-match accuracy after VQA normalisation.

A generative model's answer is free text, so "Two." and "two" must count as
the same answer; normalisation (lowercase, no punctuation or articles, digits
as number words) removes differences of form, not of content. Accuracy is also
split by question type, since the shapes world asks about colour, shape,
position, size, count and presence, and a model can be good at one and blind
to another (typically: colour learnt first, shape and count last).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from multimodal.evaluators import common

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                 "eight", "nine", "ten")
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(r"[^\w\s]|_")

# First words of a (normalised) question -> its type. Checked in order.
QUESTION_TYPES = (
    ("what colour", "colour"), ("what color", "colour"),
    ("what shape", "shape"),
    ("where", "position"),
    ("what size", "size"),
    ("how many", "count"),
    ("is there", "yes_no"), ("are there", "yes_no"),
)


def to_str(x) -> str:
  """A numpy/python bytes or str scalar as str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def normalize_answer(text) -> str:
  """Lowercased, punctuation and articles dropped, digits as number words.

  Apostrophes vanish ("don't" -> "dont") and other punctuation separates words
  ("top-left" -> "top left"). Numbers 0-10 become words; larger ones stay.
  """
  text = to_str(text).lower().replace("'", "")
  words = _PUNCTUATION.sub(" ", text).split()
  words = [_NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(_NUMBER_WORDS)
           else w for w in words if w not in _ARTICLES]
  return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after normalisation."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers.")
  if not answers:
    raise ValueError("vqa_accuracy of no answers.")
  hits = [normalize_answer(p) == normalize_answer(a)
          for p, a in zip(predictions, answers)]
  return float(np.mean(hits))


def question_type(question) -> str:
  """One of colour/shape/position/size/count/yes_no, or "other"."""
  q = to_str(question).lower().strip()
  for prefix, kind in QUESTION_TYPES:
    if q.startswith(prefix):
      return kind
  return "other"


def accuracy_by_type(predictions: Sequence[str], answers: Sequence[str],
                     questions: Sequence[str]) -> dict[str, float]:
  """{"accuracy_<type>": ...} for each question type that occurs."""
  kinds = [question_type(q) for q in questions]
  out = {}
  for kind in sorted(set(kinds)):
    rows = [i for i, k in enumerate(kinds) if k == kind]
    out[f"accuracy_{kind}"] = vqa_accuracy([predictions[i] for i in rows],
                                           [answers[i] for i in rows])
  return out


def accuracy_by_object_count(predictions: Sequence[str], answers: Sequence[str],
                             questions: Sequence[str] | None,
                             num_objects: Sequence[int]) -> dict[str, float]:
  """{"accuracy_objects_<n>": ...}, and with questions also
  {"accuracy_<type>_objects_<n>": ...}, for each object count n that occurs.

  On scenes of several objects a question names one of them; a model that
  answers about whichever object it sees, not the one named, scores about
  1/n on its type at n objects while it is perfect on one-object scenes.
  """
  out = {}
  for n in sorted(set(num_objects)):
    rows = [i for i, m in enumerate(num_objects) if m == n]
    pick = lambda values: [values[i] for i in rows]
    out[f"accuracy_objects_{n}"] = vqa_accuracy(pick(predictions), pick(answers))
    if questions is not None:
      out.update({f"{k}_objects_{n}": v for k, v in accuracy_by_type(
          pick(predictions), pick(answers), pick(questions)).items()})
  return out


def real_rows(batch: dict, values, what: str) -> list:
  """The entries of `values` (one per batch row) on rows where _mask is True.

  String columns are this process's rows (they cannot be global arrays), so
  with several processes their length differs from the global mask's; that
  case is refused rather than silently misaligned.
  """
  mask = common.to_host(batch["_mask"]).astype(bool)
  values = list(values)
  if len(values) != len(mask):
    raise ValueError(
        f"{what}: {len(values)} rows for a batch of {len(mask)}. String "
        "evaluators support a single process only (strings stay per-process).")
  return [v for v, keep in zip(values, mask) if keep]


@dataclasses.dataclass
class VQAAccuracy:
  """Exact-match accuracy of generated answers, overall and per question type.

  Batches (numpy or global arrays, leading axis = rows):
    image: whatever `answer_fn` needs, e.g. [B, H, W, 3].
    question: [B] bytes/str, the question asked of each row (optional: needed
      only for the per-type split; `answer_fn` presumably reads it too).
    num_objects: [B] int, the objects in each row's image (optional: splits
      the accuracy by object count, see accuracy_by_object_count).
    answer: [B] bytes/str, the reference answer of each row.
    _mask: [B] bool, False on padding rows.
  `answer_fn(params, batch)` returns one answer string per row, padding rows
  included (theirs are ignored). Single process only: the string columns are
  per-process numpy rows, matched to the mask row for row.

  Returns {"accuracy", "accuracy_<type>" for each question type present},
  and the split by object count when the batches carry num_objects.
  """
  name: str
  batches: Callable[[], Iterable[dict]]
  answer_fn: Callable  # (params, batch) -> list[str], one per row.

  def run(self, params) -> dict:
    predictions, answers, questions, num_objects = [], [], [], []
    for batch in self.batches():
      predictions += real_rows(batch, self.answer_fn(params, batch), "answer_fn")
      answers += real_rows(batch, batch["answer"], "answer")
      if "question" in batch:
        questions += real_rows(batch, batch["question"], "question")
      if "num_objects" in batch:
        num_objects += real_rows(batch, common.to_host(batch["num_objects"]).tolist(),
                                 "num_objects")
    if not answers:
      raise ValueError("the evaluation split yielded no examples.")
    predictions = [to_str(p) for p in predictions]
    answers = [to_str(a) for a in answers]
    out = {"accuracy": vqa_accuracy(predictions, answers)}
    if len(questions) == len(answers):
      out.update(accuracy_by_type(predictions, answers, questions))
    if len(num_objects) == len(answers):
      out.update(accuracy_by_object_count(
          predictions, answers, questions if len(questions) == len(answers) else None,
          num_objects))
    return out
