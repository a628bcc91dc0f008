"""diffusers ``DiTTransformer2DModel`` weights -> our ``dit.DiT``.

What the mapping rests on (read off diffusers 0.42's dit_transformer_2d.py,
attention.py, normalization.py and embeddings.py; the parity tests check it):

  * Timesteps: ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``
    i.e. [cos, sin] features with frequencies 10000**(-i / (128 - 1)). The
    original DiT divides by 128, so imported models need t_freq_shift=1.
  * Per-block embedders: diffusers gives EVERY block its own
    ``norm1.emb`` (timestep MLP + label table) and each block conditions on its
    own copy; the final layer uses block 0's. DiT (and dit.DiT) has ONE shared
    t_embedder / y_embedder. Checkpoints converted from DiT hold identical
    copies, so we take block 0's and refuse a checkpoint whose copies differ
    (it has no exact equivalent in the shared model).
  * Label table: ``LabelEmbedding`` with dropout 0.1 hard-coded, so it has
    num_classes + 1 rows and the null (CFG) class is the LAST row, index
    num_classes: exactly dit.LabelEmbedder's layout.
  * adaLN-Zero chunk order (``AdaLayerNormZero``): shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp, as DiT's and ours; the final
    ``proj_out_1`` splits into (shift, scale), again as ours. No reordering.
  * Attention: separate to_q / to_k / to_v / to_out.0 Linears (heads-major
    output features), scale head_dim**-0.5. FeedForward ``ff.net.0.proj`` /
    ``ff.net.2`` with tanh-GELU ("gelu-approximate"), inner dim 4 * width.
  * Patch conv, sin-cos position table and unpatchify ("nhwpqc->nchpwq") are
    DiT's; the position table is a non-persistent buffer (not in the file).
  * LayerNorm eps: norm1 (inside AdaLayerNormZero) and norm_out use 1e-6 like
    DiT, but the pre-MLP norm uses the config's ``norm_eps``, default 1e-5
    (DiT trained with 1e-6; diffusers' conversion kept its default). dit.DiT
    always uses 1e-6, i.e. the value the weights were trained with; with
    norm_eps=1e-5 the two differ by O(1e-5 / activation variance), so
    norm_eps is accepted up to 1e-5 and anything larger is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.importers import safetensors_io as io
from multimodal.importers.safetensors_io import WeightImportError
from multimodal.models import dit

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
# Largest pre-MLP LayerNorm eps accepted (see the module docstring).
MAX_NORM_EPS = 1e-5
# diffusers' CombinedTimestepLabelEmbeddings hard-codes these.
CLASS_DROPOUT_PROB = 0.1
T_FREQ_SHIFT = 1.0
# Names of the embedder tensors inside every block's norm1.emb.
EMB_TENSORS = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
               "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
               "class_embedder.embedding_table.weight")
# Non-persistent in DiT's config, but present if someone saved it.
IGNORED = ("pos_embed.pos_embed",)


def _require(cfg: dict, field: str, ok, want: str, default=None):
  return io.require_field(cfg, field, ok, want, default, source="diffusers DiT",
                          target="dit.DiT")


def dit_kwargs_from_config(cfg: dict) -> dict:
  """diffusers DiTTransformer2DModel config.json -> dit.DiT(**kwargs).

  Missing fields take diffusers' defaults. Anything dit.DiT cannot represent
  exactly raises WeightImportError naming the field.
  """
  name = cfg.get("_class_name", CLASS_NAMES[0])
  if name not in CLASS_NAMES:
    raise WeightImportError(
        f"config _class_name={name!r} is not a DiT transformer (expected one of "
        f"{CLASS_NAMES}); point at the pipeline's 'transformer' folder.")
  _require(cfg, "norm_type", lambda v: v == "ada_norm_zero", "= 'ada_norm_zero' (DiT's adaLN-Zero)",
           "ada_norm_zero")
  _require(cfg, "activation_fn", lambda v: v == "gelu-approximate",
           "= 'gelu-approximate' (tanh GELU, as DiT)", "gelu-approximate")
  _require(cfg, "attention_bias", lambda v: v is True, "= true", True)
  _require(cfg, "norm_elementwise_affine", lambda v: v is False,
           "= false (DiT's LayerNorms have no affine params)", False)
  _require(cfg, "dropout", lambda v: v == 0, "= 0 (dit.DiT has no dropout)", 0.0)
  _require(cfg, "norm_eps", lambda v: isinstance(v, (int, float)) and 0 < v <= MAX_NORM_EPS,
           f"<= {MAX_NORM_EPS} (dit.DiT uses DiT's 1e-6)", 1e-5)
  # Fields of the legacy Transformer2DModel class that DiT never sets.
  for field in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
    _require(cfg, field, lambda v: v is None, "= null (no text conditioning)")
  for field in ("only_cross_attention", "double_self_attention"):
    _require(cfg, field, lambda v: not v, "= false")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  heads = _require(cfg, "num_attention_heads", is_int, "a positive int", 16)
  head_dim = _require(cfg, "attention_head_dim", is_int, "a positive int", 72)
  depth = _require(cfg, "num_layers", is_int, "a positive int", 28)
  patch = _require(cfg, "patch_size", is_int, "a positive int", 2)
  num_classes = _require(cfg, "num_embeds_ada_norm", is_int,
                         "a positive int (the number of classes)", 1000)
  in_channels = _require(cfg, "in_channels", is_int, "a positive int", 4)
  _require(cfg, "sample_size", lambda v: is_int(v) and v % patch == 0,
           f"a positive multiple of patch_size={patch}", 32)
  out_channels = cfg.get("out_channels") or in_channels
  _require(cfg, "out_channels", lambda v: v in (None, in_channels, 2 * in_channels),
           f"in_channels ({in_channels}) or 2 * in_channels (learned sigma)")
  return dict(
      patch_size=(patch, patch), width=heads * head_dim, depth=depth, num_heads=heads,
      # BasicTransformerBlock's FeedForward: mult=4, no ff_inner_dim for DiT.
      mlp_ratio=4.0, num_classes=num_classes, class_dropout_prob=CLASS_DROPOUT_PROB,
      learn_sigma=out_channels == 2 * in_channels, t_freq_shift=T_FREQ_SHIFT)


def input_shape(cfg: dict) -> tuple[int, int, int]:
  """(H, W, C) of the latents the checkpoint was trained on."""
  size = cfg.get("sample_size", 32)
  return (size, size, cfg.get("in_channels", 4))


def expected_params(kwargs: dict, shape: tuple[int, int, int]):
  """Our DiT's parameter tree as shapes (jax.eval_shape: nothing allocated)."""
  model = dit.DiT(**kwargs)
  args = (jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32),
          jax.ShapeDtypeStruct((1,), jnp.int32))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]


def _check_tied_embedders(sd: io.StateDict, depth: int) -> None:
  for i in range(1, depth):
    for name in EMB_TENSORS:
      key = f"transformer_blocks.{i}.norm1.emb.{name}"
      if not np.array_equal(sd.get(key), sd.get(f"transformer_blocks.0.norm1.emb.{name}")):
        raise WeightImportError(
            f"{key} differs from block 0's copy. diffusers' DiTTransformer2DModel keeps "
            "a separate timestep/class embedder in every block, while DiT (and "
            "dit.DiT) shares one; checkpoints converted from DiT hold identical "
            "copies, this one does not (trained or fine-tuned in diffusers?), so it "
            "has no exact equivalent in dit.DiT.")


def convert_dit(state_dict, cfg: dict) -> dict:
  """diffusers DiT state dict (name -> array) -> our DiT params (nested dict of
  float32 numpy arrays), checked against dit.DiT's own parameter tree."""
  kwargs = dit_kwargs_from_config(cfg)
  heads, width = kwargs["num_heads"], kwargs["width"]
  hd = width // heads
  sd = io.StateDict(state_dict, "diffusers DiT checkpoint")
  out: dict[str, np.ndarray] = {}

  def dense(ours: str, theirs: str):
    out[f"{ours}/kernel"] = io.linear(sd.get(f"{theirs}.weight"))
    out[f"{ours}/bias"] = sd.get(f"{theirs}.bias")

  out["x_embedder/kernel"] = io.conv(sd.get("pos_embed.proj.weight"))
  out["x_embedder/bias"] = sd.get("pos_embed.proj.bias")
  emb = "transformer_blocks.0.norm1.emb"
  dense("t_embedder/linear_1", f"{emb}.timestep_embedder.linear_1")
  dense("t_embedder/linear_2", f"{emb}.timestep_embedder.linear_2")
  out["y_embedder/embedding_table/embedding"] = sd.get(
      f"{emb}.class_embedder.embedding_table.weight")
  _check_tied_embedders(sd, kwargs["depth"])

  for i in range(kwargs["depth"]):
    src, dst = f"transformer_blocks.{i}", f"blocks_{i}"
    dense(f"{dst}/adaLN_modulation", f"{src}.norm1.linear")
    for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
      w = io.linear(sd.get(f"{src}.attn1.{theirs}.weight"))  # (width, heads * hd)
      out[f"{dst}/attn/{ours}_kernel"] = w.reshape(w.shape[0], heads, hd)
      out[f"{dst}/attn/{ours}_bias"] = sd.get(f"{src}.attn1.{theirs}.bias").reshape(heads, hd)
    w = io.linear(sd.get(f"{src}.attn1.to_out.0.weight"))  # (heads * hd, width)
    out[f"{dst}/attn/out_kernel"] = w.reshape(heads, hd, w.shape[1])
    out[f"{dst}/attn/out_bias"] = sd.get(f"{src}.attn1.to_out.0.bias")
    dense(f"{dst}/mlp/Dense_0", f"{src}.ff.net.0.proj")
    dense(f"{dst}/mlp/Dense_1", f"{src}.ff.net.2")

  dense("final_layer/adaLN_modulation", "proj_out_1")
  dense("final_layer/linear", "proj_out_2")
  sd.check_all_used(ignore=IGNORED)
  params = io.unflatten(out)
  io.check_tree(params, expected_params(kwargs, input_shape(cfg)), "diffusers DiT weights")
  return params


def load_dit(directory: str) -> tuple[dict, dict]:
  """(dit.DiT kwargs, params) from a local diffusers DiT model directory, e.g.
  the ``transformer/`` folder of facebook/DiT-XL-2-256. Build the model with
  ``dit.DiT(**kwargs)`` and call it on latents of ``input_shape(cfg)``."""
  cfg, state = io.read_model_dir(directory)
  return dit_kwargs_from_config(cfg), convert_dit(state, cfg)
