"""Vision Transformer image tower (after big_vision's models/vit.py)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from multimodal.models import layers, variants

Dtype = Any

# name -> (width, depth, mlp_dim, num_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),      # unit tests / smoke runs
    "nano": (128, 4, 512, 4),   # CPU demos
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict:
  """"B/16" -> dict(width, depth, mlp_dim, num_heads, patch_size=(16, 16)).

  The patch part is optional ("S" gives no patch_size key) and may be
  rectangular ("B/16x8" -> (16, 8)).
  """
  parsed = variants.parse(variant)
  if not parsed or parsed[0] not in VARIANTS:
    raise ValueError(f"Unknown model variant {variant!r}; valid names are "
                     f"{sorted(VARIANTS)}, optionally followed by /PATCH (e.g. 'B/16').")
  name, patch = parsed
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    out["patch_size"] = patch
  return out


class ViT(nn.Module):
  """ViT on NHWC images.

  If ``variant`` is given it OVERRIDES width/depth/mlp_dim/num_heads (and
  patch_size when the variant names one); the explicit fields are used only
  when ``variant`` is None.

  Position embeddings: "learn" follows the original ViT/timm layout (one
  learned row per token, including the cls token for pool_type="tok", which is
  what the published parameter counts assume); "sincos2d" is added to patch
  tokens only (the cls token gets none, as in MAE/big_vision).

  ``__call__(image, train=False) -> (out, aux)``: ``out`` is logits (B,
  num_classes) if num_classes else the pooled features (B, width) — or the
  token sequence (B, N, width) for pool_type="none". ``aux`` holds
  "encoded" (B, N, width: final-LN patch tokens, no cls), "pre_logits" and
  "blocks" ({"block00": (B, N, width), ...}, patch tokens only, before the
  final LN). N = number of patches.

  Options that exist for imported checkpoints (defaults = our own models):
  ``pre_norm`` adds a LayerNorm ("norm_pre") after the position embeddings,
  before the encoder (OpenAI CLIP's ln_pre); ``patch_bias=False`` drops the
  patch conv's bias and ``head_bias=False`` the head's (CLIP has neither);
  ``mlp_activation`` names a layers.ACTIVATIONS entry and ``norm_eps`` is the
  epsilon of every LayerNorm in the tower. The encoder's final LN is applied
  per token before pooling, so for pool_type="tok" it equals CLIP's
  post_layernorm of the cls token, and for "map" SigLIP's post_layernorm.

  ``last_block_pooled_only`` (pool_type="tok"): the last block computes the
  cls token alone, the only one pooling reads (it still attends over every
  token): the same output for about 1/depth less work. ``aux`` then has no
  "encoded" and no last entry in "blocks"; modules that read the tokens (a
  VLM's image tower) build the tower with it off.
  """
  num_classes: int | None = None
  variant: str | None = None
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None  # None -> 4 * width
  num_heads: int = 12
  posemb: str = "learn"  # "learn" | "sincos2d"
  stem: str = "patch"  # "patch" | "conv"
  pool_type: str = "tok"  # "tok" | "gap" | "map" | "none"
  head_zeroinit: bool = True
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  pre_norm: bool = False
  patch_bias: bool = True
  head_bias: bool = True
  mlp_activation: str = "gelu_tanh"
  norm_eps: float = layers.LN_EPS
  last_block_pooled_only: bool = False

  def _config(self) -> dict:
    cfg = dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
               num_heads=self.num_heads, patch_size=tuple(self.patch_size))
    if self.variant is not None:
      cfg.update(decode_variant(self.variant))
    return cfg

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    cfg = self._config()
    width, ps = cfg["width"], cfg["patch_size"]
    if self.pool_type not in ("tok", "gap", "map", "none"):
      raise ValueError(f"Unknown pool_type {self.pool_type!r}")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"Unknown posemb {self.posemb!r}")
    if self.last_block_pooled_only and self.pool_type != "tok":
      raise ValueError(
          f"last_block_pooled_only needs pool_type='tok' (one pooled token), "
          f"not {self.pool_type!r}: set it False, or pool_type='tok'.")
    aux = {}

    if self.stem == "patch":
      x = nn.Conv(width, ps, strides=ps, padding="VALID", use_bias=self.patch_bias,
                  dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                 (None, None, None, "embed")),
                  bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                  name="embedding")(jnp.asarray(image, self.dtype))
    elif self.stem == "conv":
      x = ConvStem(width, ps, dtype=self.dtype, name="conv_stem")(image)
    else:
      raise ValueError(f"Unknown stem {self.stem!r}; use 'patch' or 'conv'.")
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    num_patches = h * w

    if self.posemb == "sincos2d":
      x = x + layers.posemb_sincos_2d(h, w, c, dtype=self.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), [n, 1, 1]), x], axis=1)
    if self.posemb == "learn":
      x = x + layers.learned_posemb(self, x.shape[1], c, dtype=self.dtype)
    if self.pre_norm:
      x = layers.layer_norm("norm_pre", self.dtype, self.norm_eps)(x)
    x = nn.with_logical_constraint(x, layers.RESIDUAL)
    # The tokens entering the first block: the stem's local features with
    # their positions, before attention mixes them (a VLM may tap these).
    aux["embedded"] = x[:, x.shape[1] - num_patches:]
    x = nn.Dropout(self.dropout)(x, not train)

    ntok = x.shape[1] - num_patches
    cls_only = jnp.zeros((n, 1), jnp.int32) if self.last_block_pooled_only else None
    x, blocks = layers.Encoder(
        depth=cfg["depth"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
        dropout=self.dropout, remat=self.remat, dtype=self.dtype,
        mlp_activation=self.mlp_activation, norm_eps=self.norm_eps, name="Transformer",
    )(x, deterministic=not train, last_queries=cls_only)
    if self.last_block_pooled_only:  # x: the cls token alone, (B, 1, width).
      blocks.pop(f"block{cfg['depth'] - 1:02d}")
    else:
      aux["encoded"] = x[:, ntok:]
    # Drop the cls token so every tap is a clean (B, N, width) patch grid.
    aux["blocks"] = {k: v[:, ntok:] for k, v in blocks.items()}

    if self.pool_type == "tok":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "map":
      x = layers.MAPHead(mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"], dtype=self.dtype,
                         mlp_activation=self.mlp_activation, norm_eps=self.norm_eps,
                         name="MAPHead_0")(x)
    aux["pre_logits"] = x

    if self.num_classes:
      x = layers.head_dense(self.num_classes, self.head_zeroinit, self.dtype,
                            use_bias=self.head_bias)(x)
      aux["logits"] = x
    return x, aux


class ConvStem(nn.Module):
  """Early convolutions in place of the patchify layer (Xiao et al. 2021,
  "Early Convolutions Help Transformers See Better"): log2(patch) stride-2 3x3
  convolutions, then a 1x1 projection to the width, summed with a plain
  linear patch embedding. The token grid is the same as patchify's; small
  models then learn local shape far faster.
  """
  width: int
  patch_size: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    ph, pw = self.patch_size
    if ph != pw or ph & (ph - 1):
      raise ValueError(f"stem='conv' needs a square power-of-two patch, got {self.patch_size}")
    num_convs = ph.bit_length() - 1
    x = jnp.asarray(image, self.dtype)
    for i in range(num_convs):
      # Channels double at each halving, ending at the width (>= 16): a
      # narrower last conv (half the width) learnt shape markedly slower in a
      # supervised probe at the same step time.
      channels = max(16, self.width // 2 ** (num_convs - 1 - i))
      x = nn.Conv(channels, (3, 3), strides=2, padding="SAME", use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32,
                  # Output channels named "embed" so that FSDP splits these
                  # kernels too (the last holds width/2 x width x 9 numbers).
                  kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                 (None, None, None, "embed")),
                  name=f"conv{i}")(x)
      # Norm parameters are few and unsharded (None).
      x = nn.gelu(nn.LayerNorm(
          dtype=self.dtype, param_dtype=jnp.float32,
          scale_init=layers.partitioned(nn.initializers.ones, (None,)),
          bias_init=layers.partitioned(nn.initializers.zeros, (None,)),
          name=f"norm{i}")(x))
    x = nn.Conv(self.width, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="embedding")(x)
    # Plus a linear patchify of the raw pixels. Without it, colour reaches the
    # tokens only through the normalised, rectified conv path, and on the
    # shapes world a contrastive model then learnt one of colour and shape and
    # for thousands of steps not the other; with it both are learnt together.
    patchify = nn.Conv(self.width, (ph, pw), strides=(ph, pw), padding="VALID",
                       use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                      (None, None, None, "embed")),
                       name="patch_embedding")
    return x + patchify(jnp.asarray(image, self.dtype))
