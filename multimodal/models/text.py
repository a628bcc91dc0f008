"""Text transformer tower (after big_vision's proj/image_text/text_transformer)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from multimodal.models import layers
from multimodal.models.vit import decode_variant

Dtype = Any

POOL_TYPES = ("eos", "last", "argmax", "first", "gap")


def pool_index(tokens, pool: str, eos_id: int, pad_id: int | None):
  """(B, L) int tokens -> (B,) index of the position a pool type reads.

  "eos": first position holding eos_id (falls back to "last" when a row has no
  eos, e.g. truncated text); "last": last non-pad position (right padding
  assumed); "argmax": largest token id (OpenAI CLIP's eot trick); "first": 0.
  """
  length = tokens.shape[1]
  pos = jnp.arange(length)
  valid = jnp.ones_like(tokens, bool) if pad_id is None else tokens != pad_id
  last = jnp.max(jnp.where(valid, pos, 0), axis=1)
  if pool == "last":
    return last
  if pool == "eos":
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), last)
  if pool == "argmax":
    return jnp.argmax(tokens, axis=1)
  if pool == "first":
    return jnp.zeros(tokens.shape[:1], jnp.int32)
  raise ValueError(f"No single index for pool {pool!r}")


class TextTransformer(nn.Module):
  """Token ids (B, L) -> (out, aux).

  ``variant`` (e.g. "B"; same table as ViT, no patch) overrides
  width/depth/mlp_dim/num_heads when given. Pads (``pad_id``; None = no
  padding) are masked as attention keys; ``causal=True`` adds a causal mask.
  Learned position embeddings have ``max_len`` rows (default: the length seen
  at init) and are sliced to the input length.

  ``out`` is ``head(pooled)`` of size num_classes when num_classes is set,
  else the pooled (B, width) features. ``aux``: "encoded" (B, L, width, after
  the final LN), "pooled" (B, width), "blocks" (per-block outputs).

  For imported checkpoints: ``head_bias=False`` drops the head's bias (CLIP's
  text_projection has none), ``mlp_activation`` names a layers.ACTIVATIONS
  entry, ``norm_eps`` is every LayerNorm's epsilon. HF CLIP is causal=True,
  pool="eos" (or "argmax") and SigLIP pool="last", both with pad_id=None:
  CLIP's causal mask already hides the pads after the EOS, SigLIP was trained
  attending to its pads, and both published tokenizers pad with the eos id,
  which a pad mask would hide from attention.

  ``last_block_pooled_only`` (any pool but "gap"): the last block computes
  the pooled position alone (it still attends over every token): the same
  output for about 1/depth less work. ``aux`` then has no "encoded" and no
  last entry in "blocks"; modules that read every token (a DiT's text
  conditioning) build the tower with it off.
  """
  vocab_size: int
  num_classes: int | None = None
  variant: str | None = None
  width: int = 512
  depth: int = 12
  mlp_dim: int | None = None  # None -> 4 * width
  num_heads: int = 8
  causal: bool = False
  pool: str = "last"
  eos_id: int = 1
  pad_id: int | None = 0
  max_len: int | None = None
  head_zeroinit: bool = False
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  head_bias: bool = True
  mlp_activation: str = "gelu_tanh"
  norm_eps: float = layers.LN_EPS
  last_block_pooled_only: bool = False

  def _config(self) -> dict:
    cfg = dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
               num_heads=self.num_heads)
    if self.variant is not None:
      v = decode_variant(self.variant)
      if "patch_size" in v:
        raise ValueError(f"Text variant {self.variant!r} must not name a patch size")
      cfg.update(v)
    return cfg

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    if self.pool not in POOL_TYPES:
      raise ValueError(f"Unknown pool {self.pool!r}; valid: {POOL_TYPES}")
    if self.last_block_pooled_only and self.pool == "gap":
      raise ValueError("last_block_pooled_only needs a pool that reads one position "
                       f"({', '.join(p for p in POOL_TYPES if p != 'gap')}), not 'gap': "
                       "set it False, or another pool.")
    cfg = self._config()
    width = cfg["width"]
    b, length = tokens.shape

    x = nn.Embed(self.vocab_size, width, dtype=self.dtype, param_dtype=jnp.float32,
                 embedding_init=layers.partitioned(nn.linear.default_embed_init,
                                                   ("vocab", "embed")),
                 name="embedding")(tokens)
    max_len = self.max_len or length
    if length > max_len:
      raise ValueError(f"Text length {length} exceeds max_len {max_len}")
    x = x + layers.learned_posemb(self, max_len, width, dtype=self.dtype)[:, :length]
    x = nn.with_logical_constraint(x, layers.RESIDUAL)
    x = nn.Dropout(self.dropout)(x, not train)

    valid = jnp.ones((b, length), bool) if self.pad_id is None else tokens != self.pad_id
    mask = layers.key_padding_mask(valid)
    if self.causal:
      mask = mask & layers.causal_mask(length)

    idx = None if self.pool == "gap" else pool_index(tokens, self.pool, self.eos_id, self.pad_id)
    x, blocks = layers.Encoder(
        depth=cfg["depth"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
        dropout=self.dropout, remat=self.remat, dtype=self.dtype,
        mlp_activation=self.mlp_activation, norm_eps=self.norm_eps, name="Encoder_0",
    )(x, mask, deterministic=not train,
      last_queries=idx[:, None] if self.last_block_pooled_only else None)
    aux = {"blocks": blocks}

    if self.last_block_pooled_only:  # x: the pooled position alone, (B, 1, width).
      blocks.pop(f"block{cfg['depth'] - 1:02d}")
      pooled = x[:, 0]
    elif self.pool == "gap":
      aux["encoded"] = x
      w = valid.astype(x.dtype)[..., None]
      pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
    else:
      aux["encoded"] = x
      pooled = x[jnp.arange(b), idx]
    aux["pooled"] = pooled

    out = pooled
    if self.num_classes:
      out = layers.head_dense(self.num_classes, self.head_zeroinit, self.dtype,
                              use_bias=self.head_bias)(pooled)
    return out, aux
