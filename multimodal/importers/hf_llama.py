"""Hugging Face ``LlamaForCausalLM`` weights -> our ``decoder.Decoder``.

What the mapping rests on (read off transformers 5.23's modeling_llama.py;
tests/test_hf_llama.py checks it numerically, logits and greedy decoding):

  * Pre-norm blocks: ``input_layernorm`` -> self_attn, ``post_attention_layernorm``
    (despite its name, the norm BEFORE the MLP) -> mlp; a final ``model.norm``.
    RMSNorm weights multiply (no 1 + w as in Gemma); eps is ``rms_norm_eps``.
  * q/k/v/o_proj are bias-free Linears whose features are heads-major
    (head h owns rows [h*hd, (h+1)*hd)), scale head_dim**-0.5. RoPE uses
    rotate_half (channel i pairs with i + hd/2), which is our layout too, so
    q/k need no permutation (checkpoints converted from Meta's interleaved
    layout were permuted into this one by HF's conversion script).
  * GQA: ``repeat_kv`` gives query head h the kv head h // (heads / kv_heads),
    which is how our attention groups heads.
  * MLP: down_proj(silu(gate_proj(x)) * up_proj(x)).
  * ``tie_word_embeddings``: the file then holds no ``lm_head.weight`` (or
    one equal to the embedding, from older savers); logits use the table.
  * RoPE: transformers 5 writes ``rope_parameters`` {rope_type, rope_theta};
    older configs ``rope_theta`` and ``rope_scaling``. Only plain RoPE
    ("default", no scaling) is supported: Llama 3.x's "llama3" frequency
    scaling, linear/dynamic/yarn... raise WeightImportError naming the field.
  * Old checkpoints hold ``rotary_emb.inv_freq`` buffers, which are ignored.
  * Not used by the computation, hence not checked: max_position_embeddings
    (default RoPE has no table), pretraining_tp (transformers 5 ignores it;
    older versions only split the same matmuls), attention_dropout, dtype.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multimodal.importers import safetensors_io as io
from multimodal.importers.safetensors_io import WeightImportError
from multimodal.models import decoder as dec

SOURCE = "HF llama"
TARGET = "decoder.Decoder"
ACTIVATIONS = ("silu", "swish")  # The same function in transformers' ACT2FN.
IGNORED_SUFFIX = "rotary_emb.inv_freq"
DEFAULT_ROPE_THETA = 10_000.0
NULL_MEANS_DEFAULT = ("num_key_value_heads", "head_dim", "rope_theta", "rope_parameters")


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _field(cfg: dict, field: str, ok, want: str, default=None):
  return io.require_field(cfg, field, ok, want, default, source=SOURCE, target=TARGET)


def _rope_theta(cfg: dict) -> float:
  """rope_theta from transformers 5's rope_parameters or the legacy fields;
  anything but unscaled RoPE is refused."""
  _field(cfg, "rope_scaling", lambda v: v is None, "null (no RoPE scaling)")
  params = cfg.get("rope_parameters")
  if params is None:
    return float(_field(cfg, "rope_theta", lambda v: _number(v) and v > 0, "a positive number",
                        DEFAULT_ROPE_THETA))
  if not isinstance(params, dict):
    raise WeightImportError(f"{SOURCE} config field rope_parameters={params!r} must be an object.")
  for field, ok, want, default in (
      ("rope_type", lambda v: v == "default", "'default' (no frequency scaling)", "default"),
      ("rope_theta", lambda v: _number(v) and v > 0, "a positive number", DEFAULT_ROPE_THETA)):
    value = params.get(field, default)
    if not ok(value):
      raise WeightImportError(
          f"{SOURCE} config field rope_parameters.{field}={value!r} is not supported: "
          f"{TARGET} needs {want}.")
  extra = sorted(set(params) - {"rope_type", "rope_theta"})
  if extra:
    raise WeightImportError(
        f"{SOURCE} config field rope_parameters.{extra[0]}={params[extra[0]]!r} is not "
        f"supported: {TARGET} implements plain RoPE (rope_type 'default', rope_theta only).")
  return float(params.get("rope_theta", DEFAULT_ROPE_THETA))


def decoder_kwargs_from_config(cfg: dict) -> dict:
  """HF LlamaConfig (config.json as a dict) -> Decoder kwargs. Missing
  fields take transformers' defaults; what Decoder cannot compute exactly
  raises WeightImportError naming the field."""
  _field(cfg, "model_type", lambda v: v == "llama", "'llama' (a LlamaForCausalLM directory)")
  # null = transformers' default for these.
  cfg = {k: v for k, v in cfg.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
  width = _field(cfg, "hidden_size", _int, "a positive int")
  heads = _field(cfg, "num_attention_heads", _int, "a positive int")
  kv_heads = _field(cfg, "num_key_value_heads", lambda v: _int(v) and heads % v == 0,
                    f"a positive int dividing num_attention_heads={heads}", heads)
  head_dim = cfg.get("head_dim")
  if head_dim is None:
    _field(cfg, "hidden_size", lambda v: v % heads == 0,
           f"divisible by num_attention_heads={heads} when head_dim is null")
    head_dim = width // heads
  _field({"head_dim": head_dim}, "head_dim", lambda v: _int(v) and v % 2 == 0,
         "a positive even int (RoPE rotates channel pairs)")
  _field(cfg, "hidden_act", lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}", "silu")
  _field(cfg, "attention_bias", lambda v: v is False, "false (Decoder has no biases)", False)
  _field(cfg, "mlp_bias", lambda v: v is False, "false (Decoder has no biases)", False)
  tie = _field(cfg, "tie_word_embeddings", lambda v: isinstance(v, bool), "true or false", False)
  return dict(
      vocab_size=_field(cfg, "vocab_size", _int, "a positive int"),
      width=width,
      depth=_field(cfg, "num_hidden_layers", _int, "a positive int"),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=_field(cfg, "intermediate_size", _int, "a positive int"),
      rope_theta=_rope_theta(cfg),
      norm_eps=float(_field(cfg, "rms_norm_eps", lambda v: _number(v) and 0 < v < 1,
                            "a number in (0, 1)", 1e-6)),
      tie_embeddings=tie)


def special_token_ids(cfg: dict) -> dict:
  """bos/eos/pad ids of the config (None when absent; eos may be a list),
  for decoding.generate's eos_id / pad_id."""
  return {k: cfg.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}


def expected_params(kwargs: dict):
  """Our Decoder's parameter tree as shapes (jax.eval_shape: nothing allocated)."""
  model = dec.Decoder(**kwargs)
  x = jax.ShapeDtypeStruct((1, 1, model._config()["width"]), jnp.float32)
  pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, positions=pos,
                        mask=jnp.ones((1, 1, 1), bool))["params"]


# --------------------------------------------------------------------------
# The parameter table: (our path, HF key, layout kind, heads) per tensor.


def param_table(kwargs: dict) -> list[tuple[str, str, str, int]]:
  cfg = dec.Decoder(**kwargs)._config()
  heads, kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
  rows = [("embedding", "model.embed_tokens.weight", "same", 0)]
  for i in range(cfg["depth"]):
    o, t = f"layers_{i}", f"model.layers.{i}"
    rows += [
        (f"{o}/pre_attention_norm/scale", f"{t}.input_layernorm.weight", "same", 0),
        (f"{o}/attn/query_kernel", f"{t}.self_attn.q_proj.weight", "heads_in", heads),
        (f"{o}/attn/key_kernel", f"{t}.self_attn.k_proj.weight", "heads_in", kv_heads),
        (f"{o}/attn/value_kernel", f"{t}.self_attn.v_proj.weight", "heads_in", kv_heads),
        (f"{o}/attn/out_kernel", f"{t}.self_attn.o_proj.weight", "heads_out", heads),
        (f"{o}/pre_mlp_norm/scale", f"{t}.post_attention_layernorm.weight", "same", 0),
        (f"{o}/mlp/gate/kernel", f"{t}.mlp.gate_proj.weight", "linear", 0),
        (f"{o}/mlp/up/kernel", f"{t}.mlp.up_proj.weight", "linear", 0),
        (f"{o}/mlp/down/kernel", f"{t}.mlp.down_proj.weight", "linear", 0),
    ]
  rows.append(("final_norm/scale", "model.norm.weight", "same", 0))
  if not kwargs.get("tie_embeddings"):
    rows.append(("lm_head", "lm_head.weight", "linear", 0))
  return rows


def _to_ours(kind: str, x: np.ndarray, heads: int) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "linear":
    return io.linear(x)
  if kind == "heads_in":  # (heads * hd, width) -> (width, heads, hd)
    w = io.linear(x)
    return w.reshape(w.shape[0], heads, -1)
  if kind == "heads_out":  # (width, heads * hd) -> (heads, hd, width)
    w = io.linear(x)
    return w.reshape(heads, -1, w.shape[1])
  raise AssertionError(kind)


def _check_tied_head(sd: io.StateDict, state_dict) -> None:
  """A tied checkpoint may still carry lm_head.weight; HF ties it to the
  embedding on load, so it must BE the embedding to mean the same model."""
  if "lm_head.weight" not in state_dict:
    return
  head, table = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
  if head.shape != table.shape or not np.array_equal(head, table):
    raise WeightImportError(
        f"{SOURCE} config field tie_word_embeddings=True, but the checkpoint's lm_head.weight "
        "differs from model.embed_tokens.weight; set tie_word_embeddings to false if the "
        "head is separate.")


def convert(state_dict, cfg: dict) -> dict:
  """HF LlamaForCausalLM state dict (name -> array) -> Decoder params (nested
  dict of float32 numpy arrays), checked against the tree of
  ``Decoder(**decoder_kwargs_from_config(cfg))``."""
  kwargs = decoder_kwargs_from_config(cfg)
  sd = io.StateDict(state_dict, "HF LlamaForCausalLM checkpoint")
  expected = expected_params(kwargs)
  want = {k: tuple(v.shape) for k, v in io.flatten(nn.meta.unbox(expected)).items()}
  out = {}
  for ours, theirs, kind, heads in param_table(kwargs):
    x = sd.get(theirs)
    try:
      y = np.array(_to_ours(kind, x, heads), np.float32, order="C")
    except ValueError:  # A size the head count does not divide.
      y = None
    if y is None or y.shape != want[ours]:
      raise WeightImportError(
          f"{theirs} has shape {x.shape}, which does not fit {ours} {want[ours]}; does the "
          "checkpoint belong to this config.json?")
    out[ours] = y
  if kwargs["tie_embeddings"]:
    _check_tied_head(sd, state_dict)
  sd.check_all_used(ignore=[k for k in state_dict if k.endswith(IGNORED_SUFFIX)])
  params = io.unflatten(out)
  io.check_tree(params, expected, "HF LlamaForCausalLM weights")
  return params


def load_hf_llama(directory: str) -> tuple[dict, dict]:
  """(Decoder kwargs, params) from a local HF LlamaForCausalLM directory
  (config.json + model.safetensors or shards, as save_pretrained writes)."""
  cfg, state = io.read_model_dir(directory)
  return decoder_kwargs_from_config(cfg), convert(state, cfg)
