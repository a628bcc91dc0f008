"""The tokenizer of a Hugging Face CLIP / SigLIP / Llama checkpoint.

Imported text towers pool at a position fixed by the special-token layout
their tokenizer produced in training (CLIP: the EOS; SigLIP: the last of 64
positions), so ids must be laid out exactly as HF's tokenizer + processor do:

  CLIP:   [bos] + tokens + [eos], then pad_id (HF pads with "<|endoftext|>",
          the eos itself; the causal tower never sees pads from the EOS).
  SigLIP: tokens + [eos] (not added again when the text already ends with
          it, as SiglipTokenizer does), then pad_id, to max_len (the
          processor's padding="max_length", 64 in published models).
  Llama:  [bos] + tokens + [eos], then pad_id (the eos when the checkpoint
          names no pad token, as Llama's do not): LlamaTokenizer's bos, and
          the eos that ends every sequence our decoder reads or writes (the
          VLM's text layout keeps the prompt's bos and drops the answer's).

Too-long texts lose content tokens, never the special ones (HF's
truncation=True). The text itself is split by the directory's tokenizer.json
through the ``tokenizers`` package with add_special_tokens=False: the
layout above is applied here rather than by the file's post-processor, which
not every tokenizer.json has (and transformers' CLIPTokenizer replaces anyway).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from multimodal.importers.safetensors_io import WeightImportError, read_json_object

TOKENIZER_FILE = "tokenizer.json"
# family -> (tokenizer_class names, default special tokens).
FAMILIES = {
    "clip": (("CLIPTokenizer", "CLIPTokenizerFast"),
             dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                  pad_token="<|endoftext|>")),
    "siglip": (("SiglipTokenizer", "SiglipTokenizerFast"),
               dict(bos_token=None, eos_token="</s>", pad_token="</s>")),
    "llama": (("LlamaTokenizer", "LlamaTokenizerFast"),
              dict(bos_token="<s>", eos_token="</s>", pad_token=None)),
}
WITH_BOS = ("clip", "llama")


class HFTokenizer:
  """tokenizers.Tokenizer + the family's special-token layout; same interface
  as multimodal.data.tokenizer.Tokenizer (vocab_size, pad_id, eos_id, encode)."""

  def __init__(self, tokenizer, family: str, *, bos_id: int | None, eos_id: int,
               pad_id: int):
    self._tok = tokenizer
    self.family = family
    self.bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def _layout(self, ids: list[int], max_len: int) -> list[int]:
    if self.family in WITH_BOS:
      return [self.bos_id] + ids[:max_len - 2] + [self._eos_id]
    ids = ids[:max_len - 1]
    return ids if ids and ids[-1] == self._eos_id else ids + [self._eos_id]

  def encode(self, texts: Sequence[str] | str, max_len: int) -> np.ndarray:
    """Texts -> int32 [n, max_len] laid out as the module docstring says."""
    need = 2 if self.family in WITH_BOS else 1
    if max_len < need:
      raise ValueError(f"max_len must be >= {need} (room for the special tokens), got {max_len}")
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    out = np.full((len(texts), max_len), self._pad_id, np.int32)
    for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
      ids = self._layout(list(enc.ids), max_len)
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """One row of ids -> text, without special tokens and padding."""
    text = self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)
    # CLIP's byte-level decoder keeps the "</w>" word ends; transformers'
    # CLIPTokenizer patches decode the same way.
    suffix = getattr(self._tok.model, "end_of_word_suffix", None)
    if self.family == "clip" and suffix:
      text = text.replace(suffix, " ").strip()
    return text

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Row by row, each cut at its first EOS (generated rows continue with
    padding, which need not be a special token)."""
    rows = []
    for row in np.asarray(ids):
      row = list(row)
      rows.append(self.decode(row[:row.index(self._eos_id)] if self._eos_id in row else row))
    return rows


def _read_json(path: str) -> dict:
  """The file's object, or {} when there is no such file (all are optional)."""
  return read_json_object(path) if os.path.isfile(path) else {}


def _token_str(value):
  """tokenizer_config.json holds special tokens as a string or an AddedToken dict."""
  return value.get("content") if isinstance(value, dict) else value


def _family(directory: str, tok_cfg: dict) -> str:
  cls = tok_cfg.get("tokenizer_class")
  for family, (classes, _) in FAMILIES.items():
    if cls in classes:
      return family
  model_type = _read_json(os.path.join(directory, "config.json")).get("model_type")
  if model_type in FAMILIES:
    return model_type
  raise WeightImportError(
      f"cannot tell whether {directory} holds a CLIP, SigLIP or Llama tokenizer "
      f"(tokenizer_config.json tokenizer_class={cls!r}, config.json model_type="
      f"{model_type!r}); pass family= one of {sorted(FAMILIES)}.")


def load_hf_tokenizer(directory: str, family: str | None = None) -> HFTokenizer:
  """The tokenizer of a local HF CLIP / SigLIP directory (tokenizer.json, plus
  tokenizer_config.json / special_tokens_map.json for the special tokens;
  family from tokenizer_class or config.json's model_type unless given)."""
  import tokenizers  # A transformers dependency; only needed here.

  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(path):
    spm = os.path.isfile(os.path.join(directory, "spiece.model"))
    hint = (" It has only a SentencePiece spiece.model (published SigLIP checkpoints), "
            "which is not read here: convert it to a tokenizers tokenizer.json first."
            if spm else "")
    raise WeightImportError(f"{path} does not exist.{hint}")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on bad files.
    raise WeightImportError(f"{path} is not a readable tokenizers file ({e}).") from None
  tok.no_padding()
  tok.no_truncation()
  tok_cfg = {**_read_json(os.path.join(directory, "special_tokens_map.json")),
             **_read_json(os.path.join(directory, "tokenizer_config.json"))}
  family = family or _family(directory, tok_cfg)
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
  ids = {}
  for name, default in FAMILIES[family][1].items():
    token = _token_str(tok_cfg.get(name, default))
    if name == "bos_token" and family not in WITH_BOS:
      continue
    if name == "pad_token" and token is None:
      token = _token_str(tok_cfg.get("eos_token", FAMILIES[family][1]["eos_token"]))
    ids[name] = tok.token_to_id(token) if token is not None else None
    if ids[name] is None:
      raise WeightImportError(
          f"{directory}: the {family} {name} {token!r} is not in {TOKENIZER_FILE}'s vocabulary.")
  return HFTokenizer(tok, family, bos_id=ids.get("bos_token"), eos_id=ids["eos_token"],
                     pad_id=ids["pad_token"])
