"""VQA and captioning evaluators: normalisation, attribute parsing against the
shapes world's own captions, BLEU against sacrebleu, and the evaluator loops
over fake padded batches."""
import numpy as np
import pytest
import sacrebleu

from multimodal.data import shapes_world as sw
from multimodal.evaluators import captioning, vqa

pytestmark = pytest.mark.unit


def _objects(example):
  o = example["objects"]
  return [dict(colour=c, shape=s, size=z, position=p)
          for c, s, z, p in zip(o["colour"], o["shape"], o["size"], o["position"])]


@pytest.fixture(scope="module")
def examples():
  return [sw.generate_example(0, "validation", i, image_size=16)
          for i in range(300)]


# ---------------------------------------------------------------------- VQA --
@pytest.mark.parametrize("text,expected", [
    ("Two.", "two"), ("2", "two"), (" two ", "two"), ("0", "zero"),
    ("The Red", "red"), ("a circle", "circle"), ("an orange!", "orange"),
    ("top-left", "top left"), ("Top  Left", "top left"), ("YES", "yes"),
    ("don't", "dont"), ("12", "12"), (b"Three", "three"), ("", ""),
    ("another", "another"),  # Articles are whole words only.
])
def test_normalize_answer(text, expected):
  assert vqa.normalize_answer(text) == expected


def test_vqa_accuracy():
  assert vqa.vqa_accuracy(["Two.", "red", "a circle"],
                          ["two", "Red", "circle"]) == 1.0
  assert vqa.vqa_accuracy(["3", "blue", "no", "top"],
                          ["three", "red", "yes", "top left"]) == 0.25
  with pytest.raises(ValueError):
    vqa.vqa_accuracy(["a"], ["a", "b"])


def test_question_types_cover_shapes_world(examples):
  kinds = {vqa.question_type(q) for e in examples for q in e["questions"]}
  assert kinds == {"colour", "shape", "position", "size", "count", "yes_no"}
  assert vqa.question_type("What color is it?") == "colour"
  assert vqa.question_type("why?") == "other"


def test_accuracy_by_type():
  questions = ["what colour is the star?", "what colour is the heart?",
               "how many objects are there?", "is there a red circle?"]
  out = vqa.accuracy_by_type(["red", "blue", "2", "no"],
                             ["red", "green", "two", "yes"], questions)
  assert out == {"accuracy_colour": 0.5, "accuracy_count": 1.0,
                 "accuracy_yes_no": 0.0}


def test_accuracy_by_object_count():
  """A model that names whichever object it sees: right on the one-object
  scene, right on one of the two questions about two-object scenes."""
  questions = ["what colour is the star?", "what colour is the heart?",
               "what colour is the star?", "how many objects are there?"]
  out = vqa.accuracy_by_object_count(["red", "blue", "red", "two"],
                                     ["red", "green", "red", "two"], questions, [1, 2, 2, 2])
  assert out == {"accuracy_objects_1": 1.0, "accuracy_colour_objects_1": 1.0,
                 "accuracy_objects_2": 2 / 3, "accuracy_colour_objects_2": 0.5,
                 "accuracy_count_objects_2": 1.0}
  assert vqa.accuracy_by_object_count(["a", "b"], ["a", "a"], None, [3, 3]) == {
      "accuracy_objects_3": 0.5}


def _vqa_batches(examples, batch_size=8):
  """Per-example first question, in padded batches like the eval pipeline's."""
  rows = [(e["questions"][0], e["answers"][0]) for e in examples]
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pad = batch_size - len(chunk)
    q = [r[0] for r in chunk] + [""] * pad
    a = [r[1] for r in chunk] + [""] * pad
    batches.append({"image": np.zeros((batch_size, 4, 4, 3), np.uint8),
                    "question": np.array([s.encode() for s in q]),
                    "answer": np.array([s.encode() for s in a]),
                    "_mask": np.arange(batch_size) < len(chunk)})
  return batches


def test_vqa_evaluator_oracle_and_constant(examples):
  batches = _vqa_batches(examples[:21])  # 3 batches, the last one padded.

  def oracle(params, batch):
    # Decorated right answers, and garbage on padding rows, which must be dropped.
    return [f"The {a.decode().upper()}." if m else "garbage"
            for a, m in zip(batch["answer"], batch["_mask"])]

  evaluator = vqa.VQAAccuracy("vqa", lambda: batches, oracle)
  out = evaluator.run(params=None)
  assert out["accuracy"] == 1.0
  kinds = {vqa.question_type(e["questions"][0]) for e in examples[:21]}
  assert set(out) == {"accuracy"} | {f"accuracy_{k}" for k in kinds}
  assert all(v == 1.0 for v in out.values())

  # With the scenes' object counts (padding rows hold garbage counts).
  counts = [len(e["objects"]) for e in examples[:21]] + [9] * 3
  counted = [{**b, "num_objects": np.array(counts[8 * i:8 * i + 8])}
             for i, b in enumerate(batches)]
  out = vqa.VQAAccuracy("vqa", lambda: counted, oracle).run(None)
  want = {f"accuracy_objects_{n}" for n in counts[:21]} | {
      f"accuracy_{vqa.question_type(e['questions'][0])}_objects_{len(e['objects'])}"
      for e in examples[:21]}
  assert set(out) - set(evaluator.run(None)) == want and len(want) > 3

  answers = [e["answers"][0] for e in examples[:21]]
  out = vqa.VQAAccuracy("vqa", lambda: batches,
                        lambda p, b: ["yes"] * len(b["_mask"])).run(None)
  assert out["accuracy"] == pytest.approx(answers.count("yes") / 21)
  assert out.get("accuracy_yes_no", 0.0) < 1.0 or "no" not in answers
  for kind in ("colour", "shape", "position", "size", "count"):
    assert out.get(f"accuracy_{kind}", 0.0) == 0.0


def test_vqa_evaluator_without_questions_and_wrong_length():
  batch = {"answer": np.array([b"red", b"two", b""]),
           "_mask": np.array([True, True, False])}
  out = vqa.VQAAccuracy("vqa", lambda: [batch],
                        lambda p, b: ["red", "3", "x"]).run(None)
  assert out == {"accuracy": 0.5}
  with pytest.raises(ValueError, match="single process"):
    vqa.VQAAccuracy("vqa", lambda: [batch], lambda p, b: ["red"]).run(None)


# --------------------------------------------------------------- captioning --
def test_named_attributes_hand_cases():
  named = captioning.named_attributes(
      "A small red circle in the top left corner and a large blue square on "
      "the right.")
  assert named == {"colour": ["red", "blue"], "shape": ["circle", "square"],
                   "size": ["small", "large"],
                   "position": ["top left", "right"]}
  named = captioning.named_attributes(
      b"two crosses and three stars at the bottom: a green shape.")
  assert named == {"colour": ["green"], "shape": ["cross", "star"],
                   "size": [], "position": ["bottom"]}
  assert captioning.named_attributes("") == {k: [] for k in captioning.ATTRIBUTES}


def test_named_attributes_on_real_captions(examples):
  """Every colour, shape, size and position a real caption names is in its
  scene, and the captions (all three per image) score 1.0 precision."""
  captions, objects = [], []
  for e in examples:
    objs = _objects(e)
    for caption in e["captions"]:
      named = captioning.named_attributes(caption)
      for key in captioning.ATTRIBUTES:
        assert set(named[key]) <= {o[key] for o in objs}, (caption, objs)
      # Every object is named by colour or shape (DETAIL_PROBABILITIES).
      assert named["colour"] or named["shape"], caption
      captions.append(caption)
      objects.append(objs)
  out = captioning.attribute_accuracy(captions, objects)
  for key in ("attribute_accuracy", "colour_accuracy", "shape_accuracy",
              "size_accuracy", "position_accuracy"):
    assert out[key] == 1.0, key
  assert out["empty_fraction"] == 0.0
  # About 80% of captions name shapes (DETAIL_PROBABILITIES), and those name all.
  assert 0.7 < out["object_recall"] < 0.9


def test_attribute_accuracy_hand_cases():
  scene = [dict(colour="red", shape="circle"), dict(colour="blue", shape="star")]
  out = captioning.attribute_accuracy(["a red circle and a blue star."], [scene])
  assert out["attribute_accuracy"] == 1.0 and out["object_recall"] == 1.0
  # A colour that is absent: 3 of 4 named attributes right.
  out = captioning.attribute_accuracy(["a green circle and a blue star."], [scene])
  assert out["attribute_accuracy"] == 0.75
  assert out["colour_accuracy"] == 0.5 and out["shape_accuracy"] == 1.0
  # Both attributes present but on different objects still counts as right:
  # precision against the scene, not binding.
  out = captioning.attribute_accuracy(["a blue circle."], [scene])
  assert out["attribute_accuracy"] == 1.0 and out["object_recall"] == 0.5
  assert "size_accuracy" not in out


def test_attribute_accuracy_empty_captions_score_zero():
  scene = [dict(colour="red", shape="circle")]
  out = captioning.attribute_accuracy(["", "a photo."], [scene, scene])
  assert out == {"attribute_accuracy": 0.0, "colour_accuracy": 0.0,
                 "shape_accuracy": 0.0, "object_recall": 0.0,
                 "empty_fraction": 1.0}
  # One right caption and one empty: the empty one counts as a wrong mention.
  out = captioning.attribute_accuracy(["a red circle.", ""], [scene, scene])
  assert out["attribute_accuracy"] == pytest.approx(2 / 3)
  assert out["colour_accuracy"] == 1.0 and out["empty_fraction"] == 0.5


def test_bleu4_matches_sacrebleu():
  hyps = ["a red circle on the left.", "there is a blue star."]
  refs = [["a red circle on the left side.", "we can see a red circle."],
          ["a photo of a blue star."]]
  expected = sacrebleu.corpus_bleu(
      hyps, [[refs[0][0], refs[1][0]], [refs[0][1], None]]).score / 100
  assert captioning.bleu4(hyps, refs) == pytest.approx(expected)
  assert 0 < expected < 1
  # Empty strings are missing references, like the b"" padding of batches.
  assert captioning.bleu4(hyps, [refs[0], refs[1] + [""]]) == pytest.approx(expected)
  # With one reference each, it is exactly sacrebleu's single-stream score.
  assert captioning.bleu4(hyps, [[refs[0][0]], refs[1]]) == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [[refs[0][0], refs[1][0]]]).score / 100)


def test_bleu4_identical_hypothesis_is_one(examples):
  refs = [e["captions"] for e in examples[:20]]
  assert captioning.bleu4([r[1] for r in refs], refs) == pytest.approx(1.0)
  assert captioning.bleu4(["a red circle on a dark background."],
                          [["a red circle on a dark background."]]) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    captioning.bleu4(["x"], [[""]])


MAX_OBJECTS = 3


def _caption_batches(examples, batch_size=8, num_refs=4):
  """Padded batches in CaptionQuality's format: K=num_refs reference slots
  (one more than the world's 3, so b"" padding is exercised) and -1 padded ids."""
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    captions = np.full((batch_size, num_refs), b"", dtype=object)
    ids = {k: np.full((batch_size, MAX_OBJECTS), -1, np.int32)
           for k in ("colours", "shapes", "sizes", "positions")}
    for i, e in enumerate(chunk):
      captions[i, :len(e["captions"])] = [c.encode() for c in e["captions"]]
      for j, o in enumerate(_objects(e)):
        ids["colours"][i, j] = sw.COLOURS.index(o["colour"])
        ids["shapes"][i, j] = sw.SHAPES.index(o["shape"])
        ids["sizes"][i, j] = sw.SIZES.index(o["size"])
        ids["positions"][i, j] = sw.POSITIONS.index(o["position"])
    batches.append({"image": np.zeros((batch_size, 4, 4, 3), np.uint8),
                    "captions": captions.astype(bytes), **ids,
                    "_mask": np.arange(batch_size) < len(chunk)})
  return batches


def test_caption_quality_evaluator(examples):
  chunk = examples[:21]
  batches = _caption_batches(chunk)

  def first_reference(params, batch):
    # Padding rows get a wrong caption, which must not count.
    return [c[0].decode() if m else "a white hexagon and a purple heart."
            for c, m in zip(batch["captions"], batch["_mask"])]

  out = captioning.CaptionQuality("captions", lambda: batches,
                                  first_reference).run(params=None)
  assert out["attribute_accuracy"] == 1.0
  assert out["size_accuracy"] == 1.0 and out["position_accuracy"] == 1.0
  assert out["empty_fraction"] == 0.0
  assert out["bleu4"] == pytest.approx(1.0)
  expected = captioning.attribute_accuracy([e["captions"][0] for e in chunk],
                                           [_objects(e) for e in chunk])
  assert {k: out[k] for k in expected} == pytest.approx(expected)

  # Without size/position ids only the colour/shape metrics are reported.
  for b in batches:
    del b["sizes"], b["positions"]
  out = captioning.CaptionQuality("captions", lambda: batches,
                                  lambda p, b: [""] * len(b["_mask"])).run(None)
  assert out == {"attribute_accuracy": 0.0, "colour_accuracy": 0.0,
                 "shape_accuracy": 0.0, "object_recall": 0.0,
                 "empty_fraction": 1.0, "bleu4": 0.0}


def test_caption_quality_constant_caption_scores_low(examples):
  """The same caption for every image: BLEU can stay respectable while the
  named attributes are mostly wrong."""
  batches = _caption_batches(examples[:64])
  out = captioning.CaptionQuality(
      "captions", lambda: batches,
      lambda p, b: ["a photo of a red circle."] * len(b["_mask"])).run(None)
  assert out["attribute_accuracy"] < 0.4
  assert out["object_recall"] < 0.3
