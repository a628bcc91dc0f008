"""SentencePiece tokenizer: training, caching, encoding (numpy and tf.data).

Id convention (shared by every model in the codebase): pad=0, eos=1, unk=2,
no bos. Every encoded sequence ends with an explicit EOS, so a text model can
pool on / stop at EOS and a decoder knows when a caption ends.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer:
  """A SentencePiece model plus the pad/EOS/truncation convention."""

  def __init__(self, model_path: str):
    self.model_path = str(model_path)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    # A model trained elsewhere with other special ids would silently
    # produce garbage (e.g. padding that counts as a real token).
    sp = self._sp
    got = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
    if got != (PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError(
          f"SentencePiece model {self.model_path} has (pad, eos, unk, bos) "
          f"ids {got}; this codebase needs (0, 1, 2, -1). Retrain it with "
          "train_sentencepiece().")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  def encode(self, texts: Sequence[str] | str, max_len: int) -> np.ndarray:
    """Encodes texts to an int32 array [n, max_len] (a single str gives n=1).

    Each row is the text's ids followed by EOS, then pad_id. Too-long texts
    are truncated to max_len - 1 ids so that EOS is always the last real token.
    """
    return self.encode_with_flags(texts, max_len)[0]

  def encode_with_flags(self, texts: Sequence[str] | str, max_len: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`encode`, plus which rows were truncated and which texts are empty
    (nothing but whitespace): (ids [n, max_len], truncated [n], empty [n])."""
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1 (room for EOS), got {max_len}")
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
             for t in texts]
    out = np.full((len(texts), max_len), PAD_ID, dtype=np.int32)
    truncated = np.zeros(len(texts), bool)
    for row, ids in enumerate(self._sp.encode(texts, out_type=int)):
      truncated[row] = len(ids) > max_len - 1
      ids = ids[: max_len - 1] + [EOS_ID]
      out[row, : len(ids)] = ids
    empty = np.array([not t.strip() for t in texts], bool)
    return out, truncated, empty

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes one sequence of ids; stops at the first EOS, ignores pad."""
    ids = np.asarray(ids).reshape(-1).tolist()
    if EOS_ID in ids:
      ids = ids[: ids.index(EOS_ID)]
    return self._sp.decode([int(i) for i in ids if i != PAD_ID])

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Decodes an [n, len] array of ids row by row."""
    return [self.decode(row) for row in np.asarray(ids)]

  def tf_encode(self, text, max_len: int, *, with_flags: bool = False):
    """`encode` for tf.data: scalar string -> [max_len], 1-D -> [n, max_len].

    Runs the same Python code path as `encode` through tf.numpy_function, so
    ids are identical. (Holds the GIL: fine for captions, which are short.)
    with_flags=True returns (ids, truncated, empty): bool scalars, true when
    the text (for 1-D input: any of the texts) was cut to fit max_len, or
    holds nothing but whitespace.
    """
    import tensorflow as tf  # Local: numpy-only users need not pay for TF.

    text = tf.convert_to_tensor(text)
    if text.dtype != tf.string:
      raise TypeError(f"tf_encode needs a string tensor, got {text.dtype}")
    rank = text.shape.rank
    if rank not in (0, 1):
      raise ValueError("tf_encode needs a scalar or 1-D string tensor, got "
                       f"shape {text.shape}")
    shape = [max_len] if rank == 0 else [text.shape[0], max_len]

    def _np_encode(t):
      ids, truncated, empty = self.encode_with_flags(
          np.asarray(t).reshape(-1).tolist(), max_len)
      return ids[0] if rank == 0 else ids, truncated.any(), empty.any()

    ids, truncated, empty = tf.numpy_function(
        _np_encode, [text], [tf.int32, tf.bool, tf.bool], stateful=False)
    # numpy_function loses shape information; restore it for batching.
    ids.set_shape(shape)
    truncated.set_shape([])
    empty.set_shape([])
    return (ids, truncated, empty) if with_flags else ids


def train_sentencepiece(texts: Iterable[str], model_path: str,
                        vocab_size: int, *, model_type: str = "bpe") -> str:
  """Trains a SentencePiece model on `texts`, saved at `model_path`.

  Text is NFKC-normalised and case-folded, so "Red" and "red" share ids.
  hard_vocab_limit=False lets small corpora produce fewer than `vocab_size`
  pieces instead of failing. The file appears atomically: a crash (or a
  concurrent reader) never sees a half-written model.

  BPE by default: on a templated caption corpus with few distinct words (the
  shapes world has 86), unigram's EM pruning dropped common words such as
  "red" and stopped at 89 pieces whatever vocab_size asked for, giving
  captions about twice as many tokens as BPE, which keeps one piece per word.
  """
  model_path = os.path.abspath(model_path)
  directory = os.path.dirname(model_path)
  os.makedirs(directory, exist_ok=True)
  # Same directory as the target, so os.replace is an atomic rename.
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp_",
                                  suffix=".model")
  try:
    with os.fdopen(fd, "wb") as writer:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts),
          model_writer=writer,
          vocab_size=vocab_size,
          model_type=model_type,
          pad_id=PAD_ID,
          eos_id=EOS_ID,
          unk_id=UNK_ID,
          bos_id=-1,
          normalization_rule_name="nmt_nfkc_cf",
          character_coverage=1.0,
          num_threads=2,
          hard_vocab_limit=False,
          minloglevel=1,  # Training INFO logs are hundreds of lines.
      )
    os.replace(tmp_path, model_path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return model_path


def get_tokenizer(model_path: str | None, *, cache_dir: str, cache_name: str,
                  texts_fn: Callable[[], Iterable[str]],
                  vocab_size: int) -> Tokenizer:
  """Loads `model_path`, or trains-once-and-caches a model from `texts_fn()`.

  With model_path=None the model is cached at
  `{cache_dir}/{cache_name}_v{vocab_size}.model`; `texts_fn` is only called
  when that file does not exist yet.
  """
  if model_path is not None:
    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"SentencePiece model file not found: {model_path!r}. Fix the "
          "tokenizer model path in the config, or set it to None to train a "
          "tokenizer on the training captions, cached under "
          f"{cache_dir!r}.")
    return Tokenizer(model_path)
  cached = os.path.join(cache_dir, f"{cache_name}_v{vocab_size}.model")
  if not os.path.isfile(cached):
    print(f"Training a SentencePiece tokenizer (vocab_size={vocab_size}) on "
          f"the training captions -> {cached}", flush=True)
    train_sentencepiece(texts_fn(), cached, vocab_size)
  return Tokenizer(cached)
