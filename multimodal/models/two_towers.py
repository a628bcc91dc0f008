"""CLIP / SigLIP two-tower model (after big_vision's proj/image_text/two_towers)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from multimodal.models import layers
from multimodal.models.text import TextTransformer
from multimodal.models.vit import ViT

Dtype = Any


def l2_normalize(x, eps: float = 1e-8):
  # In float32: contrastive logits are dot products of these, and bf16 norms
  # are too coarse for a temperature of ~100.
  x = x.astype(jnp.float32)
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def tower_kwargs(tower: dict, out_dim: int, dtype: Dtype) -> dict:
  """A tower dict -> the tower module's kwargs. The dict key "projection"
  (default True) says whether the tower ends in a Dense "head" to out_dim;
  False is for towers whose pooled features already are the embedding (HF
  SigLIP's image tower, whose MAP head output is compared directly)."""
  tower = dict(tower)
  projection = tower.pop("projection", True)
  return {"head_zeroinit": False, "dtype": dtype, **tower,
          "num_classes": out_dim if projection else None}


def every_token_encoded(tower: dict) -> dict:
  """`tower` (a ViT or TextTransformer's fields) built to encode every token
  through its last block, for a reader of them all (the VLM's image tokens, a
  DiT's text conditioning), not only the pooled one a contrastive loss reads
  (`last_block_pooled_only`)."""
  return {**tower, "last_block_pooled_only": False}


def _check_unprojected(module, out_dim: int, which: str) -> None:
  if module.num_classes is None and module._config()["width"] != out_dim:
    raise ValueError(f"the {which} tower has projection=False, so its width "
                     f"{module._config()['width']} must equal out_dim={out_dim}.")


def text_tower(text: dict, out_dim: int, dtype: Dtype = jnp.float32) -> TextTransformer:
  """The text tower of TwoTowers(text=text, out_dim=out_dim), alone: its
  params are TwoTowers' "txt" subtree (used to condition other models)."""
  tower = TextTransformer(**tower_kwargs(text, out_dim, dtype))
  _check_unprojected(tower, out_dim, "text")
  return tower


class TwoTowers(nn.Module):
  """Image tower (ViT) + text tower (TextTransformer) with a shared space.

  Each tower is built with ``num_classes=out_dim`` so it ends in a Dense
  projection named "head" (params under "img/head" and "txt/head"; the heads
  are never zero-initialised, which would give zero embeddings), unless its
  dict sets ``"projection": False``: then its pooled features (width must be
  out_dim) are the embedding and it has no head (HF SigLIP's image tower).
  ``dtype`` is the compute dtype passed to both towers unless their dicts set one.

  ``t_log`` stores log of the temperature *multiplier* (logits = t * z_i.z_t);
  CLIP: temperature_init=1/0.07, SigLIP: 10 with bias_init=-10.

  ``__call__(image, text, train=False) -> (zimg, ztxt, aux)``: float32,
  L2-normalised embeddings (None for a None input); aux has "t" = exp(t_log)
  (unclamped), "t_log", "b" (only if bias_init is not None), "img"/"txt"
  tower aux dicts (only for towers that ran).
  """
  image: dict
  text: dict
  out_dim: int
  temperature_init: float = 10.0
  bias_init: float | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.img = ViT(**tower_kwargs(self.image, self.out_dim, self.dtype))
    _check_unprojected(self.img, self.out_dim, "image")
    self.txt = text_tower(self.text, self.out_dim, self.dtype)
    self.t_log = self.param(
        "t_log", layers.partitioned(nn.initializers.constant(math.log(self.temperature_init)), ()),
        (), jnp.float32)
    if self.bias_init is not None:
      self.b = self.param(
          "b", layers.partitioned(nn.initializers.constant(self.bias_init), ()), (), jnp.float32)

  def embed_image(self, image, *, train: bool = False):
    """(B, H, W, C) -> (zimg (B, out_dim) unit-norm float32, image-tower aux)."""
    z, aux = self.img(image, train=train)
    return l2_normalize(z), aux

  def embed_text(self, tokens, *, train: bool = False):
    """(B, L) -> (ztxt (B, out_dim) unit-norm float32, text-tower aux)."""
    z, aux = self.txt(tokens, train=train)
    return l2_normalize(z), aux

  def __call__(self, image, text, *, train: bool = False):
    aux = {"t_log": self.t_log, "t": jnp.exp(self.t_log)}
    if self.bias_init is not None:
      aux["b"] = self.b
    zimg = ztxt = None
    if image is not None:
      zimg, aux["img"] = self.embed_image(image, train=train)
    if text is not None:
      ztxt, aux["txt"] = self.embed_text(text, train=train)
    return zimg, ztxt, aux
