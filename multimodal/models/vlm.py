"""A vision-language model: ViT patch features -> projector -> decoder LM
(LLaVA's architecture, with PaliGemma's masks).

The image becomes N tokens in the LM's embedding space and goes before the
text. Which tokens attend to which is one mechanism, PaliGemma's `mask_ar`:
0 marks tokens of the prefix (the image and the prompt), attended
bidirectionally; 1 marks autoregressive tokens (the answer), attended
causally. LLaVA's fully causal attention is `causal=True` (every token 1).

Params: "img" (a ViT without head or pooling, the vision tower of a CLIP /
SigLIP run), "projector", "llm" (decoder.Decoder).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from multimodal.models import decoder, decoding, layers, two_towers
from multimodal.models.vit import ViT

PROJECTORS = ("linear", "mlp", "conv", "block")
IMAGE_POSITIONS = ("sequence", "shared")
BLOCK_HEADS = 4  # The "block" projector's attention heads (flops.py counts them).


class Projector(nn.Module):
  """Vision width -> LM width: one Dense ("linear"); LLaVA-1.5's
  Dense-GELU-Dense ("mlp"); or "conv", whose first layer is a 3x3 convolution
  over the patch grid (Honeybee's convolutional abstractor, without its
  pooling: the token count stays the same).

  "conv" is for small vision towers whose tokens hold little beyond their own
  patch: an object larger than a patch has its shape spread over its
  neighbours. On the shapes world it has not yet raised VQA accuracy
  (docs/families/vlm.md).

  "block" puts one trainable pre-LN transformer block (BLOCK_HEADS) between the
  two Dense layers: attention among the image tokens, for a frozen tower
  whose tokens do not hold an object's shape where the object is. On the
  shapes world it did not raise VQA accuracy either (docs/families/vlm.md).
  """
  kind: str
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind not in PROJECTORS:
      raise ValueError(f"projector {self.kind!r} is not one of {PROJECTORS}.")

    def dense(name):
      return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                      kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                     (None, "embed")),
                      bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
    if self.kind == "linear":
      return dense("Dense_0")(x)
    if self.kind == "block":
      hidden = layers.EncoderBlock(num_heads=BLOCK_HEADS, dtype=self.dtype,
                                   name="EncoderBlock_0")(dense("Dense_0")(x))
      return dense("Dense_1")(hidden)
    hidden = self._conv3x3(x) if self.kind == "conv" else dense("Dense_0")(x)
    # The hidden layer keeps the LM width, as in LLaVA-1.5.
    return dense("Dense_1")(nn.gelu(hidden, approximate=False))

  def _conv3x3(self, x):
    """[B, N, C] tokens of a square patch grid -> [B, N, out_dim]."""
    batch, num_tokens, channels = x.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
      raise ValueError(f'projector "conv" needs a square patch grid; got {num_tokens} tokens.')
    grid = jnp.reshape(x, (batch, side, side, channels))
    grid = nn.Conv(self.out_dim, (3, 3), padding="SAME", dtype=self.dtype,
                   param_dtype=jnp.float32, name="Conv_0",
                   kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                  (None, None, None, "embed")),
                   bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(grid)
    return jnp.reshape(grid, (batch, num_tokens, self.out_dim))


class VisionLanguageModel(nn.Module):
  """`__call__(images, text, mask_ar, input_mask) -> logits [B, L, vocab]`
  for the text positions (image positions predict nothing)."""
  image: dict  # ViT kwargs (variant, stem, posemb, ...)
  lm: dict  # decoder.Decoder kwargs (vocab_size, variant, ...)
  projector_type: str = "mlp"
  # Which ViT layer feeds the projector: -1 the final (normed) tokens, -2 the
  # penultimate block's output (LLaVA's choice), ...
  vision_layer: int = -1
  # Also feed the projector the tokens entering the tower's first block (its
  # stem's local features plus position embeddings), concatenated to the
  # chosen layer's: a small contrastive tower may pool an object's shape away
  # from its own tokens, where its stem still holds it. (On the shapes world
  # this did not raise VQA accuracy: docs/families/vlm.md.)
  stem_features: bool = False
  causal: bool = False
  # RoPE positions of the image tokens: "sequence", 0 .. N-1 in raster order
  # with the text from N (LLaVA's); "shared", all at 0 with the text from 1,
  # so that attention between text and image depends on content alone (where
  # an object sits is in its tokens: the tower's position embeddings).
  image_positions: str = "sequence"
  dtype: Any = jnp.float32

  def setup(self):
    # image=None: the LM alone (the text-only "lm" stage); no image tokens.
    self.img = (None if self.image is None else
                ViT(**two_towers.every_token_encoded(
                    {**self.image, "num_classes": None, "pool_type": "none",
                     "dtype": self.dtype})))
    self.llm = decoder.Decoder(**{**self.lm, "dtype": self.dtype})
    self.projector = Projector(self.projector_type, self.llm._config()["width"], self.dtype)

  def embed_image(self, images):
    """[B, H, W, C] -> [B, N, LM width] image tokens."""
    if self.img is None:
      return None
    _, aux = self.img(images)
    if self.vision_layer == -1:
      features = aux["encoded"]
    else:
      blocks = aux["blocks"]
      features = blocks[sorted(blocks)[self.vision_layer]]
    if self.stem_features:
      features = jnp.concatenate([aux["embedded"], features], axis=-1)
    return self.projector(features)

  def embed_prefix(self, images, tokens):
    """Image tokens followed by the prompt's token embeddings."""
    return self._with_image(self.embed_image(images), self.llm.embed(tokens))

  @staticmethod
  def _with_image(image_tokens, text_embeds):
    if image_tokens is None:
      return text_embeds
    return jnp.concatenate([image_tokens.astype(text_embeds.dtype), text_embeds], axis=1)

  def full_masks(self, num_image_tokens: int, mask_ar, input_mask):
    """mask_ar and input_mask of [image; text]: the image is prefix and real."""
    batch = mask_ar.shape[0]
    ones = jnp.ones((batch, num_image_tokens), jnp.int32)
    if self.causal:
      mask_ar = jnp.ones_like(mask_ar)
    return (jnp.concatenate([ones if self.causal else 0 * ones, mask_ar], axis=1),
            jnp.concatenate([ones, input_mask], axis=1))

  def positions(self, num_image_tokens: int, full_input_mask):
    """RoPE positions of [image; text] (B, N + L): valid tokens counted in
    order, the image's as `image_positions` says; pads take their
    predecessor's position (they are never attended)."""
    if self.image_positions not in IMAGE_POSITIONS:
      raise ValueError(f"image_positions {self.image_positions!r} is not one of "
                       f"{IMAGE_POSITIONS}.")
    counted = jnp.asarray(full_input_mask, jnp.int32)
    if self.image_positions == "shared" and num_image_tokens > 1:
      counted = counted.at[:, 1:num_image_tokens].set(0)  # They take the first's.
    return decoding.prefix_positions(counted)

  def __call__(self, images, text, mask_ar, input_mask):
    x = self.embed_prefix(images, text)
    num_image = x.shape[1] - text.shape[1]
    full_ar, full_input = self.full_masks(num_image, mask_ar, input_mask)
    mask = decoder.make_attention_mask(full_ar, full_input)
    positions = self.positions(num_image, full_input)
    logits, _ = self.llm(x, positions=positions, mask=mask)
    return logits[:, num_image:]
