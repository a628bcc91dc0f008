"""Diffusion Transformer (DiT) denoiser, after facebookresearch/DiT models.py
(Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The image path is DiT's: patchify (a conv with kernel = stride = patch) plus a
FIXED 2D sin-cos position table, ``depth`` adaLN-Zero blocks, an adaLN final
layer and unpatchify back to NHWC. The conditioning vector ``c`` (one per
example, width ``width``) is the sum of

  * the timestep embedding (always),
  * the class-label embedding, when ``num_classes`` is set,
  * a Dense projection of a pooled text embedding, when ``text_dim`` is set,

and every block reads ``c`` through SiLU -> Dense to get its shift/scale/gate.
With ``cross_attention=True`` each block also cross-attends to a projected
text-token sequence (see ``DiTBlock``).

Unconditional inputs. Every conditioning input that the model is configured
for may be omitted at call time, and then means "null": ``y=None`` is the null
class (row ``num_classes`` of the label table), ``text_emb=None`` is a learned
null text vector, ``text_tokens=None`` leaves only a learned null token to
attend to. These are exactly what a dropped example sees in training, so a
classifier-free-guidance sampler gets the unconditional half by passing
``y=num_classes`` (or None) and/or no text, or ``force_drop_ids=1``. With
NO conditioning configured (num_classes=None, text_dim=None,
cross_attention=False) the model is a plain unconditional denoiser: c = t_emb.

Parameter names follow the PyTorch DiT module names so checkpoint importers
map one-to-one (torch Linear weights transpose; fused qkv splits into
query/key/value and reshapes to (width, heads, head_dim)):

  x_embedder/{kernel (ph, pw, C, width), bias}
  t_embedder/linear_1, t_embedder/linear_2        (DiT t_embedder.mlp.0 / .2)
  y_embedder/embedding_table/embedding            (num_classes + 1, width)
  text_embedder/{kernel, bias, null_embedding}    (text_dim set)
  text_tokens_embedder/{kernel, bias, null_token} (cross_attention)
  blocks_{i}/adaLN_modulation/{kernel (width, 6 width), bias}
  blocks_{i}/attn/{query,key,value}_{kernel (width, heads, hd), bias (heads, hd)}
  blocks_{i}/attn/out_{kernel (heads, hd, width), bias}
  blocks_{i}/mlp/Dense_0 (width, 4 width), blocks_{i}/mlp/Dense_1 (DiT mlp.fc1/fc2)
  blocks_{i}/adaLN_modulation_cross, blocks_{i}/cross_attn (cross_attention)
  final_layer/adaLN_modulation (width, 2 width), final_layer/linear
                                                  (width, ph * pw * out_channels)

The LayerNorms (norm1, norm2, norm_cross, norm_final) have no parameters.
DiT's frozen ``pos_embed`` buffer is not a parameter here (it is recomputed),
so parameter counts are DiT's published ones minus num_patches * width.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from multimodal.models import layers, variants

Dtype = Any

# name -> (width, depth, num_heads); the MLP is mlp_ratio (4) x width. Patch
# sizes 2/4/8 give DiT's twelve models, e.g. "XL/2".
VARIANTS: dict[str, tuple[int, int, int]] = {
    "mu": (64, 2, 2),       # unit tests / CPU smoke runs
    "nano": (128, 4, 4),    # CPU demos (the shapes world); as ViT's nano
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def decode_variant(variant: str) -> dict:
  """"XL/2" -> dict(width, depth, num_heads, patch_size=(2, 2)).

  As vit.decode_variant: the patch part is optional ("S" gives no patch_size
  key) and may be rectangular ("B/4x2" -> (4, 2)).
  """
  parsed = variants.parse(variant)
  if not parsed or parsed[0] not in VARIANTS:
    raise ValueError(f"Unknown DiT variant {variant!r}; valid names are "
                     f"{sorted(VARIANTS)}, optionally followed by /PATCH (e.g. 'XL/2').")
  name, patch = parsed
  width, depth, num_heads = VARIANTS[name]
  out = dict(width=width, depth=depth, num_heads=num_heads)
  if patch:
    out["patch_size"] = patch
  return out


# --------------------------------------------------------------------------
# Fixed embeddings.


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0,
                       freq_shift: float = 0.0) -> jax.Array:
  """DiT's (GLIDE's) sinusoidal timestep features, float32 (B, dim).

  [cos(t * f_i), sin(t * f_i)] with f_i = max_period**(-i / (dim//2 - freq_shift)),
  i < dim//2, and a zero column appended when dim is odd. freq_shift=0 is the
  original DiT; diffusers' DiTTransformer2DModel uses freq_shift=1
  (``downscale_freq_shift=1``), which an importer of its weights must set.
  Always float32: t runs to ~1000, and bf16 would round t * f_i to garbage.
  """
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  args = t[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def posemb_sincos_2d(h: int, w: int, width: int, dtype: Dtype = jnp.float32) -> jax.Array:
  """DiT's fixed position table (MAE's get_2d_sincos_pos_embed), (1, h*w, width).

  DiT builds its grid as np.meshgrid(grid_w, grid_h), so what it calls
  "emb_h" is in fact driven by the column (x) index: the channel layout is
  [sin(x w_i), cos(x w_i), sin(y w_i), cos(y w_i)] with tokens row-major over
  (y, x) and w_i = 10000**(-i / (width/4)), i < width/4. That is exactly
  layers.posemb_sincos_2d's layout; the only difference is that layers
  divides the exponent by (width/4 - 1) (big_vision), so we pass the
  temperature T' = 10000**((n-1)/n), n = width/4, for which
  T'**(-i/(n-1)) = 10000**(-i/n). For h != w this extends DiT (square grids
  only) in the obvious way.
  """
  n = width // 4
  temperature = 10_000.0**((n - 1) / n) if n > 1 else 10_000.0
  return layers.posemb_sincos_2d(h, w, width, temperature=temperature, dtype=dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: per-example (B, D) shift/scale broadcast over the tokens of (B, N, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------
# Small helpers.


def _norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm without affine params (eps 1e-6): adaLN supplies scale/shift."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _dense(features: int, axes: tuple, dtype: Dtype, name: str,
           kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
  """Dense with DiT's default init (xavier kernel, zero bias) and named axes."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=layers.partitioned(kernel_init, axes),
                  bias_init=layers.partitioned(nn.initializers.zeros, (axes[-1],)),
                  name=name)


def _adaln(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """The ZERO-initialised modulation Dense (adaLN-Zero): gates start at 0, so
  every residual branch, and the final projection, start switched off.
  (width, k*width): the wide output is split into chunks, so "mlp" like an MLP
  hidden layer (flax forbids repeating "embed")."""
  return _dense(features, ("embed", "mlp"), dtype, name, nn.initializers.zeros)


def cond_drop_mask(module: nn.Module, batch: int, prob: float, train: bool,
                   force_drop_ids=None, rng_collection: str = "dropout") -> jax.Array:
  """DiT's token_drop decision, (batch,) bool: True = replace by null.

  force_drop_ids (anything == 1 drops; DiT's convention) wins in any mode;
  otherwise each example is dropped with probability ``prob`` in training
  only, drawing from ``rng_collection``.
  """
  if force_drop_ids is not None:
    return jnp.broadcast_to(jnp.asarray(force_drop_ids) == 1, (batch,))
  if train and prob > 0:
    return jax.random.uniform(module.make_rng(rng_collection), (batch,)) < prob
  return jnp.zeros((batch,), bool)


# --------------------------------------------------------------------------
# Conditioning embedders.


class TimestepEmbedder(nn.Module):
  """Sinusoidal features (``timestep_embedding``) -> Dense -> SiLU -> Dense.

  Params: linear_1 (freq_dim, width), linear_2 (width, width), each with a
  bias (diffusers' TimestepEmbedding names; DiT's t_embedder.mlp.0 / .mlp.2).
  """
  width: int
  frequency_embedding_size: int = 256
  max_period: float = 10_000.0
  freq_shift: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    f = timestep_embedding(t, self.frequency_embedding_size, self.max_period, self.freq_shift)
    # DiT initialises both layers N(0, 0.02) (not xavier).
    init = nn.initializers.normal(stddev=0.02)
    # The frequency axis is named "embed" only so that FSDP splits this
    # (256, width) kernel too (it is an input-feature axis like embed).
    x = _dense(self.width, ("embed", "mlp"), self.dtype, "linear_1", init)(f)
    x = nn.silu(x)
    return _dense(self.width, ("mlp", "embed"), self.dtype, "linear_2", init)(x)


class LabelEmbedder(nn.Module):
  """Class-label table with num_classes + 1 rows; row num_classes is the
  null (unconditional) class. Labels are dropped to null with probability
  ``dropout_prob`` in training (rng ``rng_collection``), or wherever
  ``force_drop_ids == 1`` in any mode, exactly as DiT's LabelEmbedder.

  Unlike DiT the null row always exists (DiT omits it when dropout_prob == 0),
  so a sampler can always ask for the unconditional embedding.

  Param: embedding_table/embedding (num_classes + 1, width), axes
  (None, "embed"): class counts like 1001 need not divide a mesh axis.
  """
  num_classes: int
  width: int
  dropout_prob: float = 0.1
  rng_collection: str = "dropout"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels, train: bool = False, force_drop_ids=None):
    labels = jnp.asarray(labels, jnp.int32)
    drop = cond_drop_mask(self, labels.shape[0], self.dropout_prob, train, force_drop_ids,
                          self.rng_collection)
    labels = jnp.where(drop, self.num_classes, labels)
    table = nn.Embed(self.num_classes + 1, self.width, dtype=self.dtype,
                     param_dtype=jnp.float32,
                     embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                                       (None, "embed")),
                     name="embedding_table")
    return table(labels)


def _text_projection(module: nn.Module):
  """(kernel, bias) of a text embedder's Dense text_dim -> width, declared
  explicitly (not nn.Dense) so they exist even when init saw no text."""
  kernel = module.param("kernel", layers.partitioned(nn.initializers.xavier_uniform(),
                                                     (None, "embed")),
                        (module.text_dim, module.width), jnp.float32)
  bias = module.param("bias", layers.partitioned(nn.initializers.zeros, ("embed",)),
                      (module.width,), jnp.float32)
  return kernel, bias


class TextEmbedder(nn.Module):
  """Pooled text embedding (B, text_dim) -> Dense -> (B, width), added to c.

  Dropped examples, and ``text_emb=None``, get the learned ``null_embedding``
  instead (the text analogue of the null class). Params are declared
  explicitly so they exist whether or not init saw a text embedding.
  """
  width: int
  text_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_emb, drop):
    kernel, bias = _text_projection(self)
    null = self.param("null_embedding",
                      layers.partitioned(nn.initializers.normal(stddev=0.02), ("embed",)),
                      (self.width,), jnp.float32).astype(self.dtype)
    if text_emb is None:
      return jnp.broadcast_to(null, (drop.shape[0], self.width))
    if text_emb.shape[-1] != self.text_dim:
      raise ValueError(f"text_emb has width {text_emb.shape[-1]}, model text_dim={self.text_dim}")
    y = jnp.asarray(text_emb, self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    return jnp.where(drop[:, None], null, y)


class TextTokenEmbedder(nn.Module):
  """Text tokens (B, L, text_dim) -> Dense -> (B, 1 + L, width) cross-attention
  context, with a learned ``null_token`` prepended that is always attendable.

  The null token is what makes "no text" well defined: a dropped example (or
  text_tokens=None) has all its real tokens masked out and attends only to
  it, instead of to an all-masked row (whose softmax would be uniform over
  padding). Returns (context, mask) with mask (B, 1 + L) bool, True = valid.
  """
  width: int
  text_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask, drop):
    kernel, bias = _text_projection(self)
    null = self.param("null_token",
                      layers.partitioned(nn.initializers.normal(stddev=0.02),
                                         (None, None, "embed")),
                      (1, 1, self.width), jnp.float32).astype(self.dtype)
    b = drop.shape[0]
    null = jnp.broadcast_to(null, (b, 1, self.width))
    if tokens is None:
      if mask is not None:
        raise ValueError("text_mask given without text_tokens")
      return null, jnp.ones((b, 1), bool)
    if tokens.shape[-1] != self.text_dim:
      raise ValueError(f"text_tokens have width {tokens.shape[-1]}, "
                       f"model text token dim={self.text_dim}")
    y = jnp.asarray(tokens, self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    valid = jnp.ones(tokens.shape[:2], bool) if mask is None else jnp.asarray(mask, bool)
    valid = valid & ~drop[:, None]
    return (jnp.concatenate([null, y], axis=1),
            jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1))


# --------------------------------------------------------------------------
# Blocks.


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block.

    shift/scale/gate (x2) = adaLN_modulation(SiLU(c))       # zero-init Dense
    x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
    [x = x + gate_ca * cross_attn(modulate(norm_cross(x), ...), context)]
    x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))

  Chunk order of the 6*width modulation output is DiT's (and diffusers'):
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.

  Cross-attention (when ``context`` is given) is gated adaLN-style by its OWN
  zero-initialised Dense (adaLN_modulation_cross -> shift, scale, gate), not by
  widening the 6*width one, so the self-attention/MLP params keep DiT's exact
  shapes for weight import. With every gate zero at init the block is the
  identity at init, with or without cross-attention.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, context=None, context_mask=None):
    d = x.shape[-1]
    cs = nn.silu(c)
    mod = _adaln(6 * d, self.dtype, "adaLN_modulation")(cs)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    y = modulate(_norm("norm1", self.dtype)(x), shift_msa, scale_msa)
    y = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(y)
    x = nn.with_logical_constraint(x + gate_msa[:, None] * y, layers.RESIDUAL)

    if context is not None:
      mod_ca = _adaln(3 * d, self.dtype, "adaLN_modulation_cross")(cs)
      shift_ca, scale_ca, gate_ca = jnp.split(mod_ca, 3, axis=-1)
      y = modulate(_norm("norm_cross", self.dtype)(x), shift_ca, scale_ca)
      mask = None if context_mask is None else layers.key_padding_mask(context_mask)
      y = layers.Attention(self.num_heads, dtype=self.dtype, name="cross_attn")(
          y, context, mask=mask)
      x = nn.with_logical_constraint(x + gate_ca[:, None] * y, layers.RESIDUAL)

    y = modulate(_norm("norm2", self.dtype)(x), shift_mlp, scale_mlp)
    # layers.MlpBlock uses nn.gelu, whose default is the tanh approximation
    # DiT uses (GELU(approximate="tanh")).
    y = layers.MlpBlock(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x + gate_mlp[:, None] * y, layers.RESIDUAL)


class FinalLayer(nn.Module):
  """norm_final (no affine) -> modulate(shift, scale from a zero-init
  adaLN_modulation(SiLU(c)), 2*width) -> zero-init ``linear`` to
  patch*patch*out_channels. Output channel order is (ph, pw, channel), DiT's.
  """
  patch_size: Sequence[int]
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    d = x.shape[-1]
    shift, scale = jnp.split(_adaln(2 * d, self.dtype, "adaLN_modulation")(nn.silu(c)), 2, -1)
    x = modulate(_norm("norm_final", self.dtype)(x), shift, scale)
    ph, pw = self.patch_size
    return layers.head_dense(ph * pw * self.out_channels, zero_init=True, dtype=self.dtype,
                             name="linear")(x)


# --------------------------------------------------------------------------
# The model.


class DiT(nn.Module):
  """DiT denoiser on NHWC inputs (typically VAE latents, e.g. 32x32x4).

  If ``variant`` is given it OVERRIDES width/depth/num_heads (and patch_size
  when the variant names one), as in vit.ViT.

  Fields:
    num_classes: label conditioning with a (num_classes + 1)-row table; None
      or 0 = no labels (then passing ``y`` is an error).
    class_dropout_prob: training-time probability of dropping an example's
      conditioning to null (CFG training). ONE decision per example drops its
      label, pooled text and text tokens together, so the dropped examples
      are fully unconditional, which is what CFG's unconditional half is.
      The draw uses the "dropout" rng collection (``cond_rng_collection``).
    learn_sigma: output 2*C channels (eps and the variance interpolation
      v, DiT's layout [eps, v] along channels) instead of C.
    text_dim: width of an optional pooled text embedding; None = no pooled
      text conditioning.
    cross_attention / text_token_dim: per-block cross-attention over a text
      token sequence of width text_token_dim (defaults to text_dim).
    t_freq_shift: 0 = DiT's timestep frequencies; 1 = diffusers'.
    remat: recompute block activations in the backward pass.
    dtype: compute dtype (params are float32); the output is in this dtype.

  ``__call__(x, t, y=None, *, text_emb=None, text_tokens=None,
  text_mask=None, train=False, force_drop_ids=None)`` with x (B, H, W, C),
  t (B,) (or a scalar, broadcast) int/float timesteps, y (B,) int labels
  (num_classes = null), text_emb (B, text_dim), text_tokens
  (B, L, text_token_dim), text_mask (B, L) bool (True = real token),
  force_drop_ids (B,) (== 1 -> null conditioning, in any mode). Returns
  (B, H, W, out_channels). H and W must be multiples of the patch size.
  """
  variant: str | None = None
  patch_size: Sequence[int] | int = (2, 2)
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int | None = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  text_dim: int | None = None
  cross_attention: bool = False
  text_token_dim: int | None = None
  t_freq_shift: float = 0.0
  cond_rng_collection: str = "dropout"
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  def _config(self) -> dict:
    ps = self.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    cfg = dict(width=self.width, depth=self.depth, num_heads=self.num_heads, patch_size=ps)
    if self.variant is not None:
      cfg.update(decode_variant(self.variant))
    return cfg

  @nn.compact
  def __call__(self, x, t, y=None, *, text_emb=None, text_tokens=None, text_mask=None,
               train: bool = False, force_drop_ids=None):
    cfg = self._config()
    width, (ph, pw) = cfg["width"], cfg["patch_size"]
    b, hh, ww, ch = x.shape
    if hh % ph or ww % pw:
      raise ValueError(f"input {hh}x{ww} is not a multiple of the patch {ph}x{pw}")
    out_channels = 2 * ch if self.learn_sigma else ch

    # Patchify. DiT initialises the conv like a Linear on the flattened
    # (ph*pw*C) patch: xavier with fan_in = ph*pw*C, fan_out = width (flax's
    # conv xavier would also multiply fan_out by ph*pw).
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                  in_axis=(0, 1, 2), out_axis=3)
    x = nn.Conv(width, (ph, pw), strides=(ph, pw), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=layers.partitioned(patch_init, (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="x_embedder")(jnp.asarray(x, self.dtype))
    _, h, w, _ = x.shape
    x = jnp.reshape(x, (b, h * w, width)) + posemb_sincos_2d(h, w, width, self.dtype)
    x = nn.with_logical_constraint(x, layers.RESIDUAL)

    # Conditioning vector c.
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    c = TimestepEmbedder(width, freq_shift=self.t_freq_shift, dtype=self.dtype,
                         name="t_embedder")(t)
    conditioned = bool(self.num_classes) or self.text_dim is not None or self.cross_attention
    if conditioned:
      drop = cond_drop_mask(self, b, self.class_dropout_prob, train, force_drop_ids,
                            self.cond_rng_collection)
    elif force_drop_ids is not None:
      raise ValueError("force_drop_ids given but the model has no conditioning")

    if self.num_classes:
      if y is None:  # Unconditional: the null class for every example.
        y = jnp.full((b,), self.num_classes, jnp.int32)
      # The drop decision is already made (shared with the text inputs).
      c = c + LabelEmbedder(self.num_classes, width, self.class_dropout_prob,
                            self.cond_rng_collection, self.dtype, name="y_embedder")(
                                y, force_drop_ids=drop)
    elif y is not None:
      raise ValueError("labels y given but num_classes is None")

    if self.text_dim is not None:
      c = c + TextEmbedder(width, self.text_dim, self.dtype, name="text_embedder")(text_emb, drop)
    elif text_emb is not None:
      raise ValueError("text_emb given but the model has text_dim=None")
    c = nn.with_logical_constraint(c, ("batch", "embed"))

    context = context_mask = None
    if self.cross_attention:
      token_dim = self.text_token_dim or self.text_dim
      if token_dim is None:
        raise ValueError("cross_attention=True needs text_token_dim (or text_dim)")
      context, context_mask = TextTokenEmbedder(width, token_dim, self.dtype,
                                                name="text_tokens_embedder")(
                                                    text_tokens, text_mask, drop)
    elif text_tokens is not None or text_mask is not None:
      raise ValueError("text_tokens given but cross_attention=False")

    block_cls = layers.remat(DiTBlock, self.remat)
    for i in range(cfg["depth"]):
      x = block_cls(cfg["num_heads"], self.mlp_ratio, self.dtype, name=f"blocks_{i}")(
          x, c, context, context_mask)

    x = FinalLayer((ph, pw), out_channels, self.dtype, name="final_layer")(x, c)
    # Unpatchify: (B, h*w, ph*pw*C) -> (B, h*ph, w*pw, C), DiT's channel order.
    x = jnp.reshape(x, (b, h, w, ph, pw, out_channels))
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return jnp.reshape(x, (b, h * ph, w * pw, out_channels))
