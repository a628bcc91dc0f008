"""Transformer building blocks shared by the image and text towers.

Every parameter is created through ``nn.with_logical_partitioning`` so the
trainer can shard any model from one rules table (logical name -> mesh axis).
The vocabulary is closed: ``LOGICAL_AXES`` below, plus ``EXTRA_LOGICAL_AXES``.

Axis-name conventions (one name per array dimension, ``None`` = never sharded):
  Dense MLP in/out           ("embed", "mlp") / ("mlp", "embed"), biases ("mlp",)/("embed",)
  attention q/k/v kernels    ("embed", "heads", "kv"), biases ("heads", "kv")
  attention out kernel       ("heads", "kv", "embed"), bias ("embed",)
  LayerNorm scale/bias       ("embed",)
  learned position emb       (None, "posemb", "embed")
  patch-embedding conv       (None, None, None, "embed"): the patch-input dims
                             (ph, pw, channels) are tiny and never worth sharding,
                             so they are unnamed rather than named "patch".
  token embedding            ("vocab", "embed")
  classifier/projection head ("embed", None): NOT ("embed", "embed") because
                             flax rejects a logical name repeated within one array,
                             and class counts (e.g. 1001) need not divide a mesh axis.
  cls token / MAP probe      (None, None, "embed");  scalars ()

Activations carry ("batch", "length", "embed") / ("batch", "length", "mlp") /
("batch", "length", "heads", "kv") constraints; these are no-ops unless the
caller sets ``nn.logical_axis_rules`` under a mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Parameter vocabulary the sharding rules table maps to mesh axes.
LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "vocab", "patch", "posemb")
# Names beyond LOGICAL_AXES used by these models: the key/value heads of
# grouped-query attention (decoder.py), fewer than the query heads.
EXTRA_LOGICAL_AXES: tuple[str, ...] = ("kv_heads",)
# Activation-only names used in with_logical_constraint calls.
ACTIVATION_AXES = ("batch", "length", "embed", "mlp", "heads", "kv")

RESIDUAL = ("batch", "length", "embed")

# flax's LayerNorm default, which every model here was built and trained with.
# Imported checkpoints pass their own (HF CLIP: 1e-5, SigLIP: 1e-6).
LN_EPS = 1e-6


def partitioned(init, axes):
  """Short alias: wrap an initializer with logical axis names."""
  return nn.with_logical_partitioning(init, axes)


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32,
               eps: float = LN_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=partitioned(nn.initializers.ones, ("embed",)),
      bias_init=partitioned(nn.initializers.zeros, ("embed",)),
      name=name,
  )


def head_dense(features: int, zero_init: bool, dtype: Dtype, name: str = "head",
               use_bias: bool = True) -> nn.Dense:
  """Final classifier/projection Dense (see module docstring for its axes).
  ``use_bias=False`` is for imported CLIP projections, which have none."""
  kinit = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(kinit, ("embed", None)),
      bias_init=partitioned(nn.initializers.zeros, (None,)),
      name=name,
  )


# --------------------------------------------------------------------------
# Position embeddings.


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Dtype = jnp.float32) -> jax.Array:
  """Fixed 2D sin-cos table of shape (1, h*w, width), as in big_vision / MAE.

  Row-major over (y, x); channels are [sin(x), cos(x), sin(y), cos(y)], each
  width//4 wide with frequencies temperature**(-i / (width//4 - 1)).
  """
  if width % 4:
    raise ValueError(f"sincos2d width must be a multiple of 4, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / (temperature**omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


def learned_posemb(module: nn.Module, length: int, width: int, name: str = "pos_embedding",
                   dtype: Dtype = jnp.float32) -> jax.Array:
  """Learned (1, length, width) table, created as a param of ``module``."""
  emb = module.param(
      name,
      partitioned(nn.initializers.normal(stddev=1 / np.sqrt(width)), (None, "posemb", "embed")),
      (1, length, width),
      jnp.float32,
  )
  return emb.astype(dtype)


# --------------------------------------------------------------------------
# Masks.


def causal_mask(length: int) -> jax.Array:
  """(1, 1, length, length) boolean mask; True = query may attend to key."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def key_padding_mask(valid: jax.Array) -> jax.Array:
  """(batch, length) bool of valid keys -> (batch, 1, 1, length) attention mask."""
  return valid[:, None, None, :]


# --------------------------------------------------------------------------
# Activations.


def quick_gelu(x):
  """OpenAI CLIP's sigmoid approximation of GELU; its checkpoints need it exactly."""
  return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by name. "gelu_tanh" (flax's default tanh approximation) is
# what our own models use; the others exist so imported checkpoints compute
# what they were trained with (HF "gelu" is the exact erf form, "quick_gelu" is
# OpenAI CLIP's). quick_gelu differs from GELU by up to 2e-2 and exact from
# tanh GELU by up to 5e-4: both show above a 1e-4 parity tolerance.
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# --------------------------------------------------------------------------
# Blocks.


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dropout -> Dense (big_vision initialisation).
  ``activation`` names an entry of ACTIVATIONS."""
  mlp_dim: int | None = None  # Defaults to 4 * input width.
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    mlp_dim = self.mlp_dim or 4 * d
    # Tiny-but-nonzero biases match big_vision; they break exact symmetry.
    bias = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=partitioned(bias, ("mlp",)), name="Dense_0")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = activation(self.activation)(x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                 bias_init=partitioned(bias, ("embed",)), name="Dense_1")(x)
    return x


class Attention(nn.Module):
  """Multi-head dot-product attention with explicit (embed, heads, kv) params.

  ``mask`` is boolean, broadcastable to (batch, heads, q_len, kv_len), True =
  attend. Softmax runs in float32 so bf16 compute stays stable.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None):
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} not divisible by num_heads {self.num_heads}")
    hd = d // self.num_heads
    # xavier over the flattened (embed) x (heads*kv) matrix, like flax's MHDPA.
    qkv_init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))

    def proj(x, name):
      k = self.param(f"{name}_kernel", partitioned(qkv_init, ("embed", "heads", "kv")),
                     (d, self.num_heads, hd), jnp.float32)
      b = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, ("heads", "kv")),
                     (self.num_heads, hd), jnp.float32)
      y = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), k.astype(self.dtype))
      y = y + b.astype(self.dtype)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q, k, v = proj(inputs_q, "query"), proj(inputs_kv, "key"), proj(inputs_kv, "value")
    q = q / jnp.sqrt(hd).astype(self.dtype)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    out_init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    ko = self.param("out_kernel", partitioned(out_init, ("heads", "kv", "embed")),
                    (self.num_heads, hd, d), jnp.float32)
    bo = self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    return jnp.einsum("bqhk,hkd->bqd", y, ko.astype(self.dtype)) + bo.astype(self.dtype)


def take_tokens(x, positions):
  """(B, L, D) tokens, (B, Q) int positions -> (B, Q, D)."""
  return jnp.take_along_axis(x, positions[:, :, None], axis=1)


def query_rows(mask, positions):
  """The rows of an attention mask (broadcastable to (B, H, L, L)) for the
  queries at (B, Q) `positions`: (B, H|1, Q, L)."""
  if mask is None or mask.shape[2] == 1:  # The same for every query.
    return mask
  mask = jnp.broadcast_to(mask, positions.shape[:1] + mask.shape[1:])
  return jnp.take_along_axis(mask, positions[:, None, :, None], axis=2)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  mlp_activation: str = "gelu_tanh"
  norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True, queries=None):
    """`queries` (B, Q) int: compute only those positions, which attend over
    every token as before; returns (B, Q, width) instead of (B, L, width)."""
    y = layer_norm("LayerNorm_0", self.dtype, self.norm_eps)(x)
    if queries is not None:
      x, mask = take_tokens(x, queries), query_rows(mask, queries)
    y = Attention(self.num_heads, dtype=self.dtype, name="MultiHeadDotProductAttention_0")(
        y if queries is None else take_tokens(y, queries), y, mask=mask)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = nn.with_logical_constraint(x + y, RESIDUAL)

    y = layer_norm("LayerNorm_1", self.dtype, self.norm_eps)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.mlp_activation,
                 name="MlpBlock_0")(y, deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x + y, RESIDUAL)


# Rematerialisation (activation checkpointing) per block, by name. What a
# block keeps for the backward pass: "none" everything (no remat); "full"
# only its input (recomputes the whole block: least memory); "dots" its
# matmul outputs (recomputes norms, activations and softmax: most of the
# saving for a fraction of the recompute); "dots_no_batch" only the matmuls
# without batch dimensions (the weight matmuls, not attention's).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(remat: bool | str) -> str:
  """True/False (the older boolean fields) -> "full"/"none"; names checked."""
  name = ("full" if remat else "none") if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: use one of {sorted(REMAT_POLICIES)} "
                     "(or True/False).")
  return name


def remat(block_cls, policy: bool | str, static_argnums=()):
  """`block_cls`, wrapped in nn.remat with the named policy (see
  REMAT_POLICIES) unless the policy is "none". static_argnums counts the
  module itself as 0."""
  name = remat_policy_name(policy)
  if name == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[name], static_argnums=static_argnums)


class Encoder(nn.Module):
  """Stack of ``depth`` EncoderBlocks followed by a final LayerNorm.

  Returns ``(normed_output, blocks)`` where ``blocks["block00"]`` ... hold each
  block's raw (un-normed) output, so callers can tap any layer (e.g. a VLM
  reading the penultimate block). ``remat`` (a REMAT_POLICIES name, or
  True = "full") recomputes block activations in the backward pass to save
  memory on large variants.
  """
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32
  mlp_activation: str = "gelu_tanh"
  norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True, last_queries=None):
    """`last_queries` (B, Q) int: the last block computes only those
    positions (a pooled token, when nothing reads the others), and the
    output and its "blocks" entry are (B, Q, width)."""
    # (self, x, mask, deterministic, queries): `deterministic` is a Python bool.
    block_cls = remat(EncoderBlock, self.remat, static_argnums=(3,))
    blocks = {}
    for i in range(self.depth):
      queries = last_queries if i == self.depth - 1 else None
      x = block_cls(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                    self.mlp_activation, self.norm_eps,
                    name=f"encoderblock_{i}")(x, mask, deterministic, queries)
      blocks[f"block{i:02d}"] = x
    return layer_norm("encoder_norm", self.dtype, self.norm_eps)(x), blocks


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens
  (the same computation as HF's SiglipMultiheadAttentionPoolingHead)."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dtype: Dtype = jnp.float32
  mlp_activation: str = "gelu_tanh"
  norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, mask=None):
    n, _, d = x.shape
    probe = self.param("probe", partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), jnp.float32)
    probe = jnp.tile(probe.astype(self.dtype), [n, 1, 1])
    x = Attention(self.num_heads, dtype=self.dtype, name="MultiHeadDotProductAttention_0")(
        probe, x, mask=mask)
    y = layer_norm("LayerNorm_0", self.dtype, self.norm_eps)(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.mlp_activation,
                     name="MlpBlock_0")(y)
    return x[:, 0]
