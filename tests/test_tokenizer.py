"""Tests for the SentencePiece tokenizer: ids, EOS/padding/truncation, caching."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from multimodal.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.unit

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond"]


def captions(n: int = 400, seed: int = 0) -> list[str]:
  """A small synthetic caption corpus, with mixed case to exercise folding."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    size = rng.choice(["small", "large"])
    other = rng.choice(SHAPES)
    text = f"A {size} {colour} {shape} to the left of a {other}."
    out.append(text.upper() if rng.random() < 0.1 else text)
  return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer_lib.Tokenizer:
  path = tmp_path_factory.mktemp("spm") / "captions.model"
  tokenizer_lib.train_sentencepiece(captions(), str(path), vocab_size=128)
  return tokenizer_lib.Tokenizer(str(path))


def test_special_ids_and_vocab(tok):
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  assert 10 < tok.vocab_size <= 128  # Soft limit: a small corpus gives fewer.


def test_frequent_words_are_single_pieces(tok):
  # With room in the vocabulary, each caption word is one token (the reason
  # for BPE: unigram split words like "red" on small caption corpora).
  for word in COLOURS + SHAPES + ["small", "large", "left"]:
    ids = tok.encode(word, 4)[0]
    assert ids[1:].tolist() == [tok.eos_id, 0, 0], (word, ids)


def test_round_trip(tok):
  text = "a small red circle to the left of a star."
  ids = tok.encode(text, 32)
  assert ids.shape == (1, 32) and ids.dtype == np.int32
  assert tok.decode(ids[0]) == text
  assert tok.decode_batch(tok.encode([text, "a blue heart."], 32)) == [
      text, "a blue heart."]


def test_eos_last_then_padding(tok):
  ids = tok.encode(
      ["a red star.", "a large green square to the left of a heart."], 40)
  for row in ids:
    n = int(np.sum(row != tok.pad_id))
    assert row[n - 1] == tok.eos_id  # EOS is the last real token ...
    assert np.all(row[n:] == tok.pad_id)  # ... followed only by padding.
    assert np.sum(row == tok.eos_id) == 1
    assert tok.eos_id not in row[: n - 1] and tok.pad_id not in row[:n]
  assert np.sum(ids[0] != 0) < np.sum(ids[1] != 0)


def test_truncation_keeps_eos(tok):
  text = "a large purple diamond to the left of a small cyan triangle."
  full = tok.encode(text, 64)[0]
  n = int(np.sum(full != tok.pad_id))
  max_len = n - 3
  cut = tok.encode(text, max_len)[0]
  assert cut.shape == (max_len,)
  assert cut[max_len - 1] == tok.eos_id
  np.testing.assert_array_equal(cut[: max_len - 1], full[: max_len - 1])
  assert tok.encode(text, 1)[0].tolist() == [tok.eos_id]


def test_case_folding(tok):
  np.testing.assert_array_equal(tok.encode("Red Circle", 16),
                                tok.encode("red circle", 16))
  np.testing.assert_array_equal(tok.encode("A RED CIRCLE.", 16),
                                tok.encode("a red circle.", 16))


def test_decode_stops_at_eos_and_ignores_pad(tok):
  a = tok.encode("a red star.", 16)[0]
  b = tok.encode("a blue heart.", 16)[0]
  n = int(np.sum(a != 0))
  # Anything after the first EOS is ignored, pads before it are skipped.
  joined = np.concatenate([[0], a[:n], b])
  assert tok.decode(joined) == "a red star."


def test_training_is_atomic_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / "sub" / "m.model"
  tokenizer_lib.train_sentencepiece(captions(100), str(path), vocab_size=40)
  assert os.listdir(tmp_path / "sub") == ["m.model"]


def test_get_tokenizer_caches(tmp_path, capsys):
  calls = []

  def texts_fn():
    calls.append(1)
    return iter(captions(200))

  kwargs = dict(cache_dir=str(tmp_path), cache_name="toy", texts_fn=texts_fn,
                vocab_size=48)
  first = tokenizer_lib.get_tokenizer(None, **kwargs)
  path = tmp_path / "toy_v48.model"
  assert path.is_file() and "Training" in capsys.readouterr().out
  mtime = os.stat(path).st_mtime_ns
  second = tokenizer_lib.get_tokenizer(None, **kwargs)
  assert calls == [1]  # The corpus was read once, on the first call only.
  assert os.stat(path).st_mtime_ns == mtime
  assert capsys.readouterr().out == ""
  np.testing.assert_array_equal(first.encode("a red star", 8),
                                second.encode("a red star", 8))
  # An explicit path loads that file without training.
  third = tokenizer_lib.get_tokenizer(str(path), **kwargs)
  assert calls == [1] and third.vocab_size == first.vocab_size


def test_missing_model_path_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model") as info:
    tokenizer_lib.get_tokenizer(missing, cache_dir=str(tmp_path),
                                cache_name="x", texts_fn=lambda: [],
                                vocab_size=32)
  assert "None" in str(info.value)  # It says how to fix it.
