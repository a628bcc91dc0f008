"""Tiny Hugging Face CLIP/SigLIP models with random weights, and a tiny BPE
tokenizer, built offline for the import and benchmark tests."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from parity import perturb_  # noqa: E402

_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=16, bos_token_id=4)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)
CONFIGS = {
    # OpenAI-style: quick_gelu, first-EOS pooling, pads = the EOS id.
    "clip_quick_gelu": ("clip", dict(
        text_config=dict(_TEXT, eos_token_id=3, pad_token_id=3),
        vision_config=_VISION, projection_dim=24)),
    # Exact GELU, other eps/widths/heads, a 3x3 patch grid, and the legacy
    # eos_token_id=2 that makes HF pool at argmax(input_ids).
    "clip_gelu_legacy_eos": ("clip", dict(
        text_config=dict(_TEXT, hidden_size=48, num_attention_heads=3, hidden_act="gelu",
                         layer_norm_eps=1e-6, eos_token_id=2, pad_token_id=0),
        vision_config=dict(_VISION, hidden_size=40, num_attention_heads=5, hidden_act="gelu",
                           layer_norm_eps=1e-6, image_size=24),
        projection_dim=16, logit_scale_init_value=3.0)),
    # MAP head (packed in_proj), no image projection, text head with bias
    # from width 48 to the vision width 32, last-position pooling.
    "siglip_map": ("siglip", dict(
        text_config=dict(_TEXT, hidden_size=48, num_attention_heads=3, projection_size=32,
                         eos_token_id=1, pad_token_id=1),
        vision_config=_VISION)),
}


def make_hf(name, **overrides):
  """CONFIGS[name] (top-level fields replaced by `overrides`), random weights
  with every parameter perturbed."""
  model_type, cfg = CONFIGS[name]
  cfg = {**cfg, **overrides}
  torch.manual_seed(0)
  if model_type == "clip":
    model = transformers.CLIPModel(transformers.CLIPConfig(**cfg))
  else:
    model = transformers.SiglipModel(transformers.SiglipConfig(**cfg))
  model = model.eval().float()
  perturb_(model)
  return model


WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of")


def train_bpe(special: list[str], clip_style: bool):
  """A tiny BPE trained on WORDS, special tokens first (ids 0, 1, ...);
  clip_style marks word ends with "</w>" as CLIP's vocabulary does."""
  from tokenizers import models, normalizers, pre_tokenizers, trainers
  suffix = {"end_of_word_suffix": "</w>"} if clip_style else {}
  tok = tokenizers.Tokenizer(models.BPE(**suffix))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=special, **suffix)
  tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
  return tok




def save_tiny_llama(directory: str, texts, **config):
  """A LlamaForCausalLM with random (perturbed) weights and a BPE tokenizer
  trained on `texts`, saved as a downloaded checkpoint is laid out
  (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)."""
  import json
  import os

  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
  tok.train_from_iterator(list(texts), trainer)
  # As Llama's tokenizer.json files do: BOS before every sequence.
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(tokenizer_class="LlamaTokenizerFast", bos_token="<s>", eos_token="</s>",
                   unk_token="<unk>", add_bos_token=True, add_eos_token=False), f)
  cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             bos_token_id=1, eos_token_id=2, **config)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval().float()
  perturb_(model, scale=0.3)
  model.save_pretrained(directory)
  return model
