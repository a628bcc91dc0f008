"""Llama-style decoder-only language model (Flax Linen).

The text half of a PaliGemma-style VLM: the caller embeds tokens with
``Decoder.embed``, concatenates image tokens from a projector in front, and
runs ``Decoder.__call__`` on the embeddings under an explicit attention mask.
Taking embeddings and a mask (rather than token ids and a causal flag) is what
lets one module serve text-only LM training, prefix-LM VLM training (image +
prompt attended bidirectionally, the answer causally) and cached decoding.

The block is Llama's, so that HF ``LlamaForCausalLM`` checkpoints import
without reshuffling anything but matrix layouts (importers/hf_llama.py):

  * pre-norm RMSNorm (x * rsqrt(mean(x^2) + eps) * scale, no bias, computed
    in float32) before attention and before the MLP, and a final RMSNorm;
  * rotary position embeddings in HF's "rotate_half" layout: a head's
    channels [0, d/2) and [d/2, d) form the rotated pairs (not interleaved
    even/odd channels as in the RoPE paper), so HF's q/k weights need no
    permutation;
  * grouped-query attention: ``num_kv_heads`` divides ``num_heads`` and query
    head h reads key/value head h // (num_heads // num_kv_heads) (HF's
    ``repeat_kv``); num_kv_heads == num_heads is plain multi-head attention;
  * a SwiGLU MLP, down(silu(gate(x)) * up(x));
  * no biases anywhere; logits from an untied ``lm_head`` or, with
    ``tie_embeddings``, the transposed embedding table.

Parameters, every one an nn.LogicallyPartitioned:
  embedding                      (vocab, width)        ("vocab", "embed")
  layers_{i}/pre_attention_norm/scale, pre_mlp_norm/scale   ("embed",)
  layers_{i}/attn/query_kernel   (width, heads, hd)    ("embed", "heads", "kv")
  layers_{i}/attn/{key,value}_kernel (width, kv_heads, hd) ("embed", "kv_heads", "kv")
  layers_{i}/attn/out_kernel     (heads, hd, width)    ("heads", "kv", "embed")
  layers_{i}/mlp/{gate,up}/kernel (width, mlp)         ("embed", "mlp")
  layers_{i}/mlp/down/kernel     (mlp, width)          ("mlp", "embed")
  final_norm/scale               (width,)              ("embed",)
  lm_head                        (width, vocab)        ("embed", "vocab"), untied only
Key/value kernels get their own "kv_heads" name because with few kv heads
(often 1-8) they cannot be split over the tensor axis that "heads" uses.

The KV cache is {"k", "v"} of shape (depth, batch, cache_len, num_kv_heads,
head_dim), keys stored after RoPE. A call with a cache writes its L new
keys/values at [cache_index, cache_index + L) and attends over the whole
cache under ``mask`` (batch, L, cache_len): the mask, not the index, says
which slots are filled and valid, so right-padded prefixes and per-row
positions need nothing else (see decoding.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multimodal.models import layers

Dtype = Any

# name -> sizes; any field given explicitly to Decoder overrides its variant's.
VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128),  # unit tests
    # mu with a SwiGLU of 4x its width (no better on the shapes world's VQA:
    # docs/families/vlm.md).
    "mu4": dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=256),
    "nano": dict(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384),  # CPU demos
    "S": dict(width=384, depth=12, num_heads=6, num_kv_heads=2, mlp_dim=1024),
    "B": dict(width=768, depth=12, num_heads=12, num_kv_heads=4, mlp_dim=2048),
    # TinyLlama-1.1B's shape (its checkpoints import with importers/hf_llama.py).
    "llama_1b": dict(width=2048, depth=22, num_heads=32, num_kv_heads=4, mlp_dim=5632),
}
SIZE_FIELDS = ("width", "depth", "num_heads", "num_kv_heads", "mlp_dim", "head_dim")

KV_AXES = ("batch", "length", "kv_heads", "kv")


def decode_variant(variant: str) -> dict:
  """"mu" -> dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown decoder variant {variant!r}; valid: {sorted(VARIANTS)}")
  return dict(VARIANTS[variant])


def default_mlp_dim(width: int) -> int:
  """Llama's SwiGLU size: 2/3 of 4 * width (same parameter count as a 4x
  GELU MLP), rounded up to a multiple of 64."""
  return -(-(8 * width // 3) // 64) * 64


def resolve_config(variant: str | None = None, **fields) -> dict:
  """The sizes a Decoder runs with: its variant's, overridden by every field
  that is not None, with num_kv_heads (= num_heads), head_dim (= width //
  num_heads) and mlp_dim (default_mlp_dim) filled in and checked."""
  cfg = decode_variant(variant) if variant is not None else {}
  cfg.update({k: v for k, v in fields.items() if v is not None})
  missing = [k for k in ("width", "depth", "num_heads") if k not in cfg]
  if missing:
    raise ValueError(f"Decoder needs a variant or explicit {missing}")
  width, heads = cfg["width"], cfg["num_heads"]
  cfg.setdefault("num_kv_heads", heads)
  cfg.setdefault("mlp_dim", default_mlp_dim(width))
  if "head_dim" not in cfg:
    if width % heads:
      raise ValueError(f"width {width} not divisible by num_heads {heads}; set head_dim")
    cfg["head_dim"] = width // heads
  if heads % cfg["num_kv_heads"]:
    raise ValueError(f"num_kv_heads {cfg['num_kv_heads']} must divide num_heads {heads}")
  if cfg["head_dim"] % 2:
    raise ValueError(f"head_dim {cfg['head_dim']} must be even (RoPE rotates pairs)")
  return {k: cfg[k] for k in SIZE_FIELDS}


# --------------------------------------------------------------------------
# Masks. All boolean, True = query i may attend to key j.


def causal_mask(length: int) -> jax.Array:
  """(1, length, length): lower-triangular, broadcastable over the batch."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


def prefix_lm_mask(mask_ar: jax.Array) -> jax.Array:
  """(B, L) mask_ar -> (B, L, L), PaliGemma's convention (big_vision's
  ``make_attn_mask``): token i attends to token j iff cumsum(mask_ar)[j] <=
  cumsum(mask_ar)[i]. Zeros (image + prompt prefix) are attended
  bidirectionally, ones autoregressively; all ones is fully causal."""
  cumsum = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32), axis=1)
  return cumsum[:, None, :] <= cumsum[:, :, None]


def make_attention_mask(mask_ar: jax.Array, input_mask: jax.Array) -> jax.Array:
  """prefix_lm_mask restricted to valid (non-pad) queries and keys; a pad
  query's row is all False (its output is garbage and must be ignored)."""
  valid = jnp.asarray(input_mask, bool)
  return prefix_lm_mask(mask_ar) & valid[:, None, :] & valid[:, :, None]


# --------------------------------------------------------------------------
# Building blocks.


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary embedding of x (B, L, H, D) at integer positions (B, L), HF
  Llama's rotate_half form: with f_i = theta^(-2i/D), i < D/2, and a = p*f,
  out = x * cos(a|a) + (-x[D/2:] | x[:D/2]) * sin(a|a)."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, the statistics in float32 (as HF's LlamaRMSNorm)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", layers.partitioned(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), bias-free."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  def _dense(self, features, axes, name):
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), axes),
                    name=name)

  @nn.compact
  def __call__(self, x):
    gate = self._dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
    up = self._dense(self.mlp_dim, ("embed", "mlp"), "up")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return self._dense(x.shape[-1], ("mlp", "embed"), "down")(h)


def write_cache(cache: dict, layer: int, index, k, v) -> dict:
  """Writes one layer's new keys/values (B, L, kv_heads, hd) into the stacked
  cache at [index, index + L) along its length axis (in place under jit)."""
  start = (layer, 0, index, 0, 0)
  return {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype),
                                             start)
          for name, new in (("k", k), ("v", v))}


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional stacked KV cache
  (``layer`` is this block's index into it)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  dtype: Dtype = jnp.float32

  def _kernel(self, name, shape, axes, in_axis, out_axis):
    init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
    return self.param(name, layers.partitioned(init, axes), shape, jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None, layer: int = 0):
    width, hd = x.shape[-1], self.head_dim
    heads, kv_heads = self.num_heads, self.num_kv_heads
    x = x.astype(self.dtype)
    wq = self._kernel("query_kernel", (width, heads, hd), ("embed", "heads", "kv"), 0, (1, 2))
    wk = self._kernel("key_kernel", (width, kv_heads, hd), ("embed", "kv_heads", "kv"), 0, (1, 2))
    wv = self._kernel("value_kernel", (width, kv_heads, hd), ("embed", "kv_heads", "kv"),
                      0, (1, 2))
    wo = self._kernel("out_kernel", (heads, hd, width), ("heads", "kv", "embed"), (0, 1), 2)

    q = jnp.einsum("bld,dhk->blhk", x, wq)
    k = jnp.einsum("bld,dhk->blhk", x, wk)
    v = jnp.einsum("bld,dhk->blhk", x, wv)
    q = nn.with_logical_constraint(apply_rope(q, positions, self.rope_theta),
                                   ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(apply_rope(k, positions, self.rope_theta), KV_AXES)
    v = nn.with_logical_constraint(v, KV_AXES)
    if cache is not None:
      cache = write_cache(cache, layer, cache_index, k, v)
      k, v = cache["k"][layer].astype(self.dtype), cache["v"][layer].astype(self.dtype)

    # Query head h = g_kv * groups + g reads kv head g_kv (HF's repeat_kv).
    b, length = q.shape[:2]
    q = q.reshape(b, length, kv_heads, heads // kv_heads, hd) * jnp.asarray(
        hd**-0.5, self.dtype)
    logits = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bkgls,bskd->blkgd", weights, v).reshape(b, length, heads, hd)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    return jnp.einsum("blhk,hkd->bld", y, wo), cache


class DecoderBlock(nn.Module):
  """x + attn(norm(x)); x + mlp(norm(x))."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None, layer: int = 0):
    y = RMSNorm(self.norm_eps, self.dtype, name="pre_attention_norm")(x)
    y, cache = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta,
                         self.dtype, name="attn")(y, positions, mask, cache, cache_index, layer)
    x = nn.with_logical_constraint(x + y, layers.RESIDUAL)
    y = RMSNorm(self.norm_eps, self.dtype, name="pre_mlp_norm")(x)
    y = SwiGLU(self.mlp_dim, self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x + y, layers.RESIDUAL), cache


# --------------------------------------------------------------------------
# The model.


class Decoder(nn.Module):
  """Decoder-only LM over input embeddings.

  Sizes: ``variant`` (a VARIANTS name) gives defaults that every explicit
  size field overrides (unlike ViT, where the variant wins); without a
  variant width, depth and num_heads are required. ``norm_eps`` is every
  RMSNorm's epsilon (HF's rms_norm_eps), ``rope_theta`` RoPE's base.

  ``embed(tokens)`` (B, L) int -> (B, L, width): the table lookup.
  ``__call__(x, *, positions, mask, cache=None, cache_index=None)`` -> (logits
  (B, L, vocab) float32, new cache or None): x (B, L, width) embeddings,
  positions (B, L) int RoPE positions, mask bool broadcastable to (B, L, S)
  with S = L without a cache and the cache length with one; see the module
  docstring for the cache. ``init_cache(batch, max_len)`` gives an empty one.
  """
  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  mlp_dim: int | None = None
  head_dim: int | None = None
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  remat: bool | str = False  # A layers.REMAT_POLICIES name (True = "full").
  dtype: Dtype = jnp.float32

  def _config(self) -> dict:
    return resolve_config(self.variant, **{k: getattr(self, k) for k in SIZE_FIELDS})

  def setup(self):
    cfg = self._config()
    # Created here (not lazily by a submodule) so init makes it whichever
    # method runs, even when __call__ never reads it (untied head).
    self.embedding = self.param(
        "embedding", layers.partitioned(nn.linear.default_embed_init, ("vocab", "embed")),
        (self.vocab_size, cfg["width"]), jnp.float32)
    # (self, x, positions, mask, cache, cache_index, layer): `layer` is an int.
    block_cls = layers.remat(DecoderBlock, self.remat, static_argnums=(6,))
    self.layers = [
        block_cls(cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["mlp_dim"],
                  self.rope_theta, self.norm_eps, self.dtype)
        for _ in range(cfg["depth"])]
    self.final_norm = RMSNorm(self.norm_eps, self.dtype)
    if not self.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", layers.partitioned(nn.initializers.lecun_normal(), ("embed", "vocab")),
          (cfg["width"], self.vocab_size), jnp.float32)

  def embed(self, tokens):
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, layers.RESIDUAL)

  def __call__(self, x, *, positions, mask, cache=None, cache_index=None):
    x = nn.with_logical_constraint(jnp.asarray(x, self.dtype), layers.RESIDUAL)
    positions = jnp.asarray(positions, jnp.int32)
    mask = jnp.broadcast_to(mask, (x.shape[0], x.shape[1], mask.shape[-1]))
    if cache is not None:
      cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
    for i, block in enumerate(self.layers):
      x, cache = block(x, positions, mask, cache, cache_index, i)
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self.embedding.astype(self.dtype))
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.lm_head.astype(self.dtype))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, cache

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeros {"k", "v"}: (depth, batch_size, max_len, num_kv_heads, head_dim).
    Needs no parameters: callable on the unbound module."""
    cfg = self._config()
    shape = (cfg["depth"], batch_size, max_len, cfg["num_kv_heads"], cfg["head_dim"])
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
