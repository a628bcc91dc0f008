"""Hugging Face ``CLIPModel`` / ``SiglipModel`` weights <-> our ``TwoTowers``.

What the mapping rests on (read off transformers 5.23's modeling_clip.py and
modeling_siglip.py; tests/test_hf_import.py checks it numerically):

  * Blocks are pre-LN like ours (layer_norm1 -> attention, layer_norm2 -> MLP)
    with separate q/k/v/out Linears whose features are heads-major, scale
    head_dim**-0.5. The MLP activation is the config's ``hidden_act``; CLIP's
    default is quick_gelu (x * sigmoid(1.702 x)), not a GELU approximation we
    could substitute: they differ by ~1e-2. LayerNorm eps is the config's
    ``layer_norm_eps`` (CLIP 1e-5, SigLIP 1e-6) in every norm of the tower.
  * CLIP vision: bias-free patch conv, a class token, learned position rows
    for cls + patches, then ``pre_layrnorm`` (sic) BEFORE the encoder
    (ViT(pre_norm=True)). ``post_layernorm`` is applied to the cls token only;
    LayerNorm is per token, so our encoder's final norm on every token followed
    by pool_type="tok" is the same. ``visual_projection`` has no bias.
  * CLIP text: causal; ``final_layer_norm`` on every token; pooled at the
    first ``eos_token_id`` -- except configs with eos_token_id == 2 (written
    before transformers PR #24773), which pool at argmax(input_ids) (OpenAI's
    "eot is the largest id" trick): pool="argmax". ``text_projection`` has no
    bias. HF only masks pads when given an attention_mask, and the causal mask
    already hides pads that follow the EOS from the pooled token, so our tower
    gets pad_id=None (OpenAI's pad id IS the eos id, which a pad mask would
    hide). A row without the EOS pools at 0 in HF and at the last position here.
  * SigLIP vision: biased patch conv, position rows for patches only (no cls),
    ``post_layernorm`` on every token, then the MAP head: torch
    ``nn.MultiheadAttention`` with PACKED ``in_proj_weight`` (q, k, v stacked
    on the output axis), a residual MLP behind ``layernorm``. No projection:
    the head's output is the embedding, so the image tower has
    ``projection=False`` and out_dim = vision hidden_size.
  * SigLIP text: bidirectional, no mask at all, pooled at the LAST position
    (padding included: SigLIP pads to max_length=64), then ``head`` (a Linear
    WITH bias) to ``projection_size``: pool="last" with pad_id=None. That is
    SiglipModel called without attention_mask, as big_vision trained it.
    transformers 5's SiglipTokenizer does return an attention_mask, and
    passing it on masks the pads the pooled (pad) position attends to: a
    different function (text features ~50% apart on the test model).
  * Logits: CLIP exp(logit_scale) * cos (logit_scale is a 0-d tensor = t_log);
    SigLIP exp(logit_scale) * cos + logit_bias (both shape (1,) = t_log, b).
  * Older checkpoints also hold ``*.embeddings.position_ids`` buffers, which
    are ignored; old configs may carry ``text_config_dict`` /
    ``vision_config_dict``, which override text_config / vision_config as in
    transformers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from multimodal.importers import safetensors_io as io
from multimodal.importers.safetensors_io import WeightImportError
from multimodal.models import two_towers
from multimodal.models.text import TextTransformer
from multimodal.models.vit import ViT

MODEL_TYPES = ("clip", "siglip")
CLASS_NAMES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# HF hidden_act -> our layers.ACTIVATIONS name. The three tanh forms are the
# same formula (gelu_fast truncates sqrt(2/pi) at 1e-11).
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# Ours -> the name written on export.
EXPORT_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# transformers' config defaults, for fields a config.json leaves out.
DEFAULTS = {
    ("clip", "text_config"): dict(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
    ("clip", "vision_config"): dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
        layer_norm_eps=1e-5),
    ("siglip", "text_config"): dict(
        vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        projection_size=None),
    ("siglip", "vision_config"): dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=True),
}
CLIP_PROJECTION_DIM = 512
CLIP_LOGIT_SCALE_INIT = 2.6592
# transformers' pre-#24773 CLIP eos id, which switches pooling to argmax.
LEGACY_EOS_ID = 2
# SigLIP's configs hold no logit init; the paper's values (params overwrite them).
SIGLIP_TEMPERATURE_INIT, SIGLIP_BIAS_INIT = 10.0, -10.0
# Persistent buffers in checkpoints saved by older transformers.
IGNORED_SUFFIX = "embeddings.position_ids"


# --------------------------------------------------------------------------
# config.json -> TwoTowers kwargs.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_eps(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1


def _tower_config(cfg: dict, model_type: str, which: str) -> dict:
  """One tower's sub-config with transformers' defaults filled in; an old
  config's ``<which>_dict`` overrides it, as in CLIPConfig.__post_init__."""
  sub = cfg.get(which) or {}
  if not isinstance(sub, Mapping):
    raise WeightImportError(f"HF config field {which} must be an object, got {sub!r}.")
  return {**DEFAULTS[model_type, which], **sub, **(cfg.get(f"{which}_dict") or {})}


class _Fields:
  """Reads one sub-config, raising WeightImportError that names the field."""

  def __init__(self, cfg: dict, model_type: str, which: str = ""):
    self.cfg, self.prefix, self.model_type = cfg, which and f"{which}.", model_type

  def get(self, field: str, ok, want: str):
    value = self.cfg.get(field)
    if not ok(value):
      raise WeightImportError(
          f"HF {self.model_type} config field {self.prefix}{field}={value!r} is not "
          f"supported: it must be {want}.")
    return value

  def common(self) -> dict:
    """Width, depth, heads, MLP and norm settings shared by both towers."""
    width = self.get("hidden_size", _is_int, "a positive int")
    heads = self.get("num_attention_heads", lambda v: _is_int(v) and width % v == 0,
                     f"a positive int dividing hidden_size={width}")
    act = self.get("hidden_act", lambda v: v in HF_ACTIVATIONS,
                   f"one of {sorted(HF_ACTIVATIONS)}")
    return dict(
        width=width, num_heads=heads,
        depth=self.get("num_hidden_layers", _is_int, "a positive int"),
        mlp_dim=self.get("intermediate_size", _is_int, "a positive int"),
        mlp_activation=HF_ACTIVATIONS[act],
        norm_eps=float(self.get("layer_norm_eps", _is_eps, "a number in (0, 1)")))

  def vision(self) -> dict:
    patch = self.get("patch_size", _is_int, "a positive int (square patches)")
    self.get("image_size", lambda v: _is_int(v) and v >= patch,
             f"a positive int >= patch_size={patch} (square images)")
    self.get("num_channels", _is_int, "a positive int")
    return dict(self.common(), patch_size=(patch, patch), posemb="learn", stem="patch")


def model_type_of(cfg: dict) -> str:
  model_type = cfg.get("model_type")
  if model_type not in MODEL_TYPES:
    raise WeightImportError(
        f"HF config field model_type={model_type!r} is not supported: this importer reads "
        f"the dual-encoder configs {MODEL_TYPES} (CLIPModel / SiglipModel). Point at the "
        "model's own directory, not at a single tower's (clip_vision_model, ...).")
  return model_type


def two_towers_kwargs_from_config(cfg: dict) -> dict:
  """HF CLIPConfig / SiglipConfig (config.json as a dict) -> TwoTowers kwargs.

  Missing fields take transformers' defaults. Anything TwoTowers cannot
  compute exactly raises WeightImportError naming the field.
  """
  model_type = model_type_of(cfg)
  vcfg = _Fields(_tower_config(cfg, model_type, "vision_config"), model_type, "vision_config")
  tcfg = _Fields(_tower_config(cfg, model_type, "text_config"), model_type, "text_config")
  text = dict(tcfg.common(),
              vocab_size=tcfg.get("vocab_size", _is_int, "a positive int"),
              max_len=tcfg.get("max_position_embeddings", _is_int, "a positive int"),
              pad_id=None)
  if model_type == "clip":
    eos = tcfg.get("eos_token_id", lambda v: isinstance(v, int) and not isinstance(v, bool),
                   "one int (the pooled token)")
    top = _Fields({"projection_dim": CLIP_PROJECTION_DIM,
                   "logit_scale_init_value": CLIP_LOGIT_SCALE_INIT, **cfg}, model_type)
    out_dim = top.get("projection_dim", _is_int, "a positive int")
    scale = top.get("logit_scale_init_value",
                    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    image = dict(vcfg.vision(), pool_type="tok", pre_norm=True, patch_bias=False,
                 head_bias=False)
    text.update(causal=True, pool="argmax" if eos == LEGACY_EOS_ID else "eos", eos_id=eos,
                head_bias=False)
    return dict(image=image, text=text, out_dim=out_dim,
                temperature_init=float(math.exp(scale)), bias_init=None)

  vcfg.get("vision_use_head", lambda v: v is True,
           "true (without the MAP head SiglipModel has no image embedding)")
  image = dict(vcfg.vision(), pool_type="map", projection=False)
  out_dim = image["width"]
  # null means the text width (transformers' default).
  tcfg.get("projection_size", lambda v: (text["width"] if v is None else v) == out_dim,
           f"the vision hidden_size {out_dim} (null = the text hidden_size "
           f"{text['width']}): the image embedding is the MAP head's output, so the text "
           "head must project to its width")
  text.update(causal=False, pool="last")
  eos = tcfg.cfg.get("eos_token_id")
  if isinstance(eos, int) and not isinstance(eos, bool):  # Unused by "last" pooling.
    text["eos_id"] = eos
  return dict(image=image, text=text, out_dim=out_dim,
              temperature_init=SIGLIP_TEMPERATURE_INIT, bias_init=SIGLIP_BIAS_INIT)


def image_shape(cfg: dict) -> tuple[int, int, int]:
  """(H, W, C) of the images the checkpoint takes (its position table's size)."""
  vision = _tower_config(cfg, model_type_of(cfg), "vision_config")
  size = vision["image_size"]
  return (size, size, vision["num_channels"])


def expected_params(kwargs: dict, shape: tuple[int, int, int]):
  """Our TwoTowers' parameter tree as shapes (jax.eval_shape: nothing allocated)."""
  model = two_towers.TwoTowers(**kwargs)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, *shape), jnp.float32),
                        jax.ShapeDtypeStruct((1, kwargs["text"]["max_len"]), jnp.int32))["params"]


# --------------------------------------------------------------------------
# The parameter table: (our path, HF key, layout kind, heads) per tensor.
# One table serves import (_to_ours) and export (_to_hf).


def _ln(ours: str, theirs: str):
  yield f"{ours}/scale", f"{theirs}.weight", "same", 0
  yield f"{ours}/bias", f"{theirs}.bias", "same", 0


def _dense(ours: str, theirs: str, bias: bool = True):
  yield f"{ours}/kernel", f"{theirs}.weight", "linear", 0
  if bias:
    yield f"{ours}/bias", f"{theirs}.bias", "same", 0


def _encoder(ours: str, theirs: str, depth: int, heads: int):
  for i in range(depth):
    o, t = f"{ours}/encoderblock_{i}", f"{theirs}.layers.{i}"
    attn = f"{o}/MultiHeadDotProductAttention_0"
    yield from _ln(f"{o}/LayerNorm_0", f"{t}.layer_norm1")
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      yield f"{attn}/{name}_kernel", f"{t}.self_attn.{proj}.weight", "heads_in", heads
      yield f"{attn}/{name}_bias", f"{t}.self_attn.{proj}.bias", "heads_bias", heads
    yield f"{attn}/out_kernel", f"{t}.self_attn.out_proj.weight", "heads_out", heads
    yield f"{attn}/out_bias", f"{t}.self_attn.out_proj.bias", "same", 0
    yield from _ln(f"{o}/LayerNorm_1", f"{t}.layer_norm2")
    yield from _dense(f"{o}/MlpBlock_0/Dense_0", f"{t}.mlp.fc1")
    yield from _dense(f"{o}/MlpBlock_0/Dense_1", f"{t}.mlp.fc2")


def _map_head(ours: str, theirs: str, heads: int):
  """SiglipMultiheadAttentionPoolingHead; its q/k/v are thirds of in_proj."""
  attn = f"{ours}/MultiHeadDotProductAttention_0"
  yield f"{ours}/probe", f"{theirs}.probe", "same", 0
  for i, name in enumerate(("query", "key", "value")):
    yield f"{attn}/{name}_kernel", f"{theirs}.attention.in_proj_weight", f"packed_in{i}", heads
    yield f"{attn}/{name}_bias", f"{theirs}.attention.in_proj_bias", f"packed_bias{i}", heads
  yield f"{attn}/out_kernel", f"{theirs}.attention.out_proj.weight", "heads_out", heads
  yield f"{attn}/out_bias", f"{theirs}.attention.out_proj.bias", "same", 0
  yield from _ln(f"{ours}/LayerNorm_0", f"{theirs}.layernorm")
  yield from _dense(f"{ours}/MlpBlock_0/Dense_0", f"{theirs}.mlp.fc1")
  yield from _dense(f"{ours}/MlpBlock_0/Dense_1", f"{theirs}.mlp.fc2")


def _towers(kwargs: dict) -> tuple[ViT, TextTransformer]:
  """The two (unbound) tower modules of TwoTowers(**kwargs); their _config()
  resolves a ``variant`` into width/depth/heads."""
  out_dim = kwargs["out_dim"]
  return (ViT(**two_towers.tower_kwargs(kwargs["image"], out_dim, jnp.float32)),
          TextTransformer(**two_towers.tower_kwargs(kwargs["text"], out_dim, jnp.float32)))


def param_table(kwargs: dict, model_type: str) -> list[tuple[str, str, str, int]]:
  image, text = (m._config() for m in _towers(kwargs))
  clip = model_type == "clip"
  v, t = "vision_model", "text_model"
  rows = [("t_log", "logit_scale", "scalar", 0)]
  if not clip:
    rows.append(("b", "logit_bias", "scalar", 0))
  rows.append(("img/embedding/kernel", f"{v}.embeddings.patch_embedding.weight", "conv", 0))
  if clip:
    rows.append(("img/cls", f"{v}.embeddings.class_embedding", "cls", 0))
  else:
    rows.append(("img/embedding/bias", f"{v}.embeddings.patch_embedding.bias", "same", 0))
  rows.append(("img/pos_embedding", f"{v}.embeddings.position_embedding.weight", "posemb", 0))
  if clip:
    rows += _ln("img/norm_pre", f"{v}.pre_layrnorm")
  rows += _encoder("img/Transformer", f"{v}.encoder", image["depth"], image["num_heads"])
  rows += _ln("img/Transformer/encoder_norm", f"{v}.post_layernorm")
  if clip:
    rows += _dense("img/head", "visual_projection", bias=False)
  else:
    rows += _map_head("img/MAPHead_0", f"{v}.head", image["num_heads"])

  rows.append(("txt/embedding/embedding", f"{t}.embeddings.token_embedding.weight", "same", 0))
  rows.append(("txt/pos_embedding", f"{t}.embeddings.position_embedding.weight", "posemb", 0))
  rows += _encoder("txt/Encoder_0", f"{t}.encoder", text["depth"], text["num_heads"])
  rows += _ln("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
  rows += _dense("txt/head", "text_projection", bias=False) if clip else _dense(
      "txt/head", f"{t}.head")
  return rows


def _to_ours(kind: str, x: np.ndarray, heads: int) -> np.ndarray:
  if kind.startswith("packed_"):  # Third i of a (3 * width, ...) in_proj tensor.
    i = int(kind[-1])
    x = np.split(x, 3, axis=0)[i]
    kind = "heads_in" if kind.startswith("packed_in") else "heads_bias"
  if kind == "same":
    return x
  if kind == "scalar":
    return x.reshape(())
  if kind == "linear":
    return io.linear(x)
  if kind == "conv":
    return io.conv(x)
  if kind == "cls":
    return x.reshape(1, 1, -1)
  if kind == "posemb":
    return x[None]
  if kind == "heads_in":  # (heads * hd, width) -> (width, heads, hd)
    w = io.linear(x)
    return w.reshape(w.shape[0], heads, -1)
  if kind == "heads_bias":
    return x.reshape(heads, -1)
  if kind == "heads_out":  # (width, heads * hd) -> (heads, hd, width)
    w = io.linear(x)
    return w.reshape(heads, -1, w.shape[1])
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind in ("same", "scalar"):
    return x
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  if kind == "cls":
    return x.reshape(-1)
  if kind == "posemb":
    return x[0]
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_bias":
    return x.reshape(-1)
  if kind == "heads_out":
    return x.reshape(-1, x.shape[-1]).T
  raise AssertionError(f"no export for layout {kind!r}")


# --------------------------------------------------------------------------
# Import.


def convert(state_dict, cfg: dict) -> dict:
  """HF CLIPModel / SiglipModel state dict (name -> array) -> our TwoTowers
  params (nested dict of float32 numpy arrays), checked against the tree of
  ``TwoTowers(**two_towers_kwargs_from_config(cfg))``."""
  kwargs = two_towers_kwargs_from_config(cfg)
  model_type = model_type_of(cfg)
  sd = io.StateDict(state_dict, f"HF {CLASS_NAMES[model_type]} checkpoint")
  out = {}
  for ours, theirs, kind, heads in param_table(kwargs, model_type):
    x = sd.get(theirs)
    try:
      out[ours] = np.array(_to_ours(kind, x, heads), np.float32, order="C")
    except ValueError as e:
      raise WeightImportError(
          f"{theirs} has shape {x.shape}, which does not fit {ours} ({e}); does the "
          "checkpoint belong to this config.json?") from None
  sd.check_all_used(ignore=[k for k in state_dict if k.endswith(IGNORED_SUFFIX)])
  params = io.unflatten(out)
  io.check_tree(params, expected_params(kwargs, image_shape(cfg)),
                f"HF {CLASS_NAMES[model_type]} weights")
  return params


def load_hf_clip(directory: str) -> tuple[dict, dict]:
  """(TwoTowers kwargs, params) from a local HF CLIPModel or SiglipModel
  directory (config.json + model.safetensors, as save_pretrained writes).
  Images are ``image_shape(config)``, in the checkpoint's own normalisation."""
  cfg, state = io.read_model_dir(directory)
  return two_towers_kwargs_from_config(cfg), convert(state, cfg)


# --------------------------------------------------------------------------
# Export (CLIP only).


def _export_error(what: str) -> WeightImportError:
  return WeightImportError(f"cannot export to HF CLIPModel: {what}")


def clip_config(kwargs: dict, params: Mapping, *, bos_token_id: int | None = None,
                pad_token_id: int | None = None) -> dict:
  """The config.json of the CLIPModel equivalent to TwoTowers(**kwargs).

  Image size, channels, vocabulary and text length are read off the params
  (the position tables fix them). Raises WeightImportError naming what HF CLIP
  cannot represent. Importing the export gives kwargs that compute the same
  function, though not always the same dict: pad_id becomes None (the causal
  mask makes pad masking moot), pool="argmax" gets eos_id=2 (HF's switch).
  """
  if kwargs.get("bias_init") is not None:
    raise _export_error("bias_init is set (a SigLIP logit bias); CLIP has none.")
  out_dim = kwargs["out_dim"]
  img_mod, txt_mod = _towers(kwargs)
  need = {  # (module, field): value HF CLIP computes with.
      ("image", "projection"): (img_mod.num_classes is not None, True),
      ("image", "pool_type"): (img_mod.pool_type, "tok"),
      ("image", "posemb"): (img_mod.posemb, "learn"),
      ("image", "stem"): (img_mod.stem, "patch"),
      ("image", "pre_norm"): (img_mod.pre_norm, True),
      ("image", "patch_bias"): (img_mod.patch_bias, False),
      ("image", "head_bias"): (img_mod.head_bias, False),
      ("text", "projection"): (txt_mod.num_classes is not None, True),
      ("text", "causal"): (txt_mod.causal, True),
      ("text", "head_bias"): (txt_mod.head_bias, False),
  }
  for (tower, field), (got, want) in need.items():
    if got != want:
      raise _export_error(f"{tower}.{field}={got!r}; HF CLIP needs {want!r}.")
  if txt_mod.pool not in ("eos", "argmax"):
    raise _export_error(f"text.pool={txt_mod.pool!r}; HF CLIP pools at the eos token "
                        "('eos', or 'argmax' via eos_token_id=2).")
  if txt_mod.pool == "eos" and txt_mod.eos_id == LEGACY_EOS_ID:
    raise _export_error(f"text.eos_id={LEGACY_EOS_ID} with pool='eos': HF reads "
                        f"eos_token_id={LEGACY_EOS_ID} as the legacy argmax pooling.")
  if txt_mod.pad_id is not None and txt_mod.pad_id == txt_mod.eos_id:
    raise _export_error("text.pad_id equals eos_id: our tower would mask the eos "
                        "token, HF does not; use pad_id=None.")
  if txt_mod.dropout or img_mod.dropout:
    raise _export_error("dropout is set; HF CLIP configs here carry none.")

  flat = io.flatten(params)
  for key in ("img/embedding/kernel", "img/pos_embedding", "txt/embedding/embedding",
              "txt/pos_embedding"):
    if key not in flat:
      raise _export_error(f"params have no {key}; are they TwoTowers(**kwargs)' params?")
  ph, pw, channels, _ = np.shape(flat["img/embedding/kernel"])
  if ph != pw:
    raise _export_error(f"patch {ph}x{pw} is not square.")
  tokens = np.shape(flat["img/pos_embedding"])[1] - 1
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise _export_error(f"{tokens} patches are not a square grid.")
  vocab, max_len = np.shape(flat["txt/embedding/embedding"])[0], np.shape(
      flat["txt/pos_embedding"])[1]
  ic, tc = img_mod._config(), txt_mod._config()

  def tower(c: dict, module, model_type: str, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=c["width"],
                intermediate_size=c["mlp_dim"] or 4 * c["width"],
                num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
                hidden_act=EXPORT_ACTIVATIONS[module.mlp_activation],
                layer_norm_eps=module.norm_eps, projection_dim=out_dim,
                attention_dropout=0.0, **extra)

  eos = LEGACY_EOS_ID if txt_mod.pool == "argmax" else txt_mod.eos_id
  return {
      "architectures": [CLASS_NAMES["clip"]], "model_type": "clip", "dtype": "float32",
      "projection_dim": out_dim,
      "logit_scale_init_value": math.log(kwargs.get("temperature_init", 10.0)),
      "text_config": tower(tc, txt_mod, "clip_text_model", vocab_size=int(vocab),
                           max_position_embeddings=int(max_len), eos_token_id=eos,
                           bos_token_id=bos_token_id,
                           pad_token_id=txt_mod.pad_id if pad_token_id is None else pad_token_id),
      "vision_config": tower(ic, img_mod, "clip_vision_model", image_size=grid * ph,
                             patch_size=ph, num_channels=int(channels)),
  }


def export_clip(kwargs: dict, params: Mapping, directory: str, **token_ids) -> dict:
  """Writes ``directory/config.json`` and ``model.safetensors`` that
  ``transformers.CLIPModel.from_pretrained(directory)`` loads with no missing
  or unexpected keys, computing what TwoTowers(**kwargs) computes. ``params``
  may be boxed (nn.Partitioned) or device arrays. ``token_ids``:
  bos_token_id / pad_token_id for the text config (the model ignores them).
  Returns the config written."""
  params = jax.device_get(nn.meta.unbox(params))
  cfg = clip_config(kwargs, params, **token_ids)
  io.check_tree(params, expected_params(kwargs, image_shape(cfg)), "exported params")
  flat = io.flatten(params)
  state = {theirs: np.array(_to_hf(kind, np.asarray(flat[ours], np.float32)), order="C")
           for ours, theirs, kind, _ in param_table(kwargs, "clip")}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, io.CONFIG_NAME), "w") as f:
    json.dump(cfg, f, indent=2)
  # transformers refuses safetensors files without format metadata.
  safetensors.numpy.save_file(state, os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})
  return cfg
