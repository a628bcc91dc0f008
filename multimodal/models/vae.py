"""A KL autoencoder (Stable Diffusion's VAE) in Flax, for latent diffusion.

The architecture is diffusers' ``AutoencoderKL`` with DownEncoderBlock2D /
UpDecoderBlock2D blocks, module for module, so its weights import one-to-one
(``importers/diffusers_vae.py``); only the layout differs (NHWC here, NCHW
there). The details that matter for parity:

  * ResnetBlock: GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3,
    plus a 1x1 ``conv_shortcut`` when the channel count changes. GroupNorm
    everywhere has ``norm_num_groups`` groups and eps 1e-6.
  * Downsample: diffusers pads (0, 1, 0, 1), i.e. ONE row/column at the
    bottom/right only, then a 3x3 stride-2 VALID conv (the LDM convention; a
    symmetric SAME pad would shift every latent by half a pixel).
  * Upsample: nearest-neighbour x2, then a 3x3 conv.
  * Mid block: resnet, single-head self-attention over the H*W positions
    (GroupNorm first, residual added, scale 1/sqrt(C)), resnet.
  * Encoder ends GroupNorm -> SiLU -> conv_out to 2 * latent_channels, then
    ``quant_conv`` (1x1); the decoder starts with ``post_quant_conv`` (1x1).
    The decoder's up blocks have layers_per_block + 1 resnets each.
  * encode() returns (mean, logvar) with logvar clamped to [-30, 20], as
    diffusers' DiagonalGaussianDistribution.

Param tree (names follow diffusers' module names, list index -> ``_i``):
  encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}/{norm1, conv1, norm2,
  conv2, conv_shortcut?}, encoder/down_blocks_{i}/downsamplers_0/conv,
  encoder/mid_block/{resnets_0, attentions_0/{group_norm, to_q, to_k, to_v,
  to_out}, resnets_1}, encoder/conv_norm_out, encoder/conv_out, quant_conv,
  post_quant_conv, decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/
  {resnets_{j}, upsamplers_0/conv}, decoder/conv_norm_out, decoder/conv_out.

Logical axes: the VAE is small and frozen during DiT training, so only the
wide channel axis is named: every conv/Dense output-channel axis (and the
GroupNorm params) is "embed" (FSDP-sharded by the project rules, replicated
without an fsdp mesh axis). The few layers whose output is image or latent
channels (3, 4, 8: never divisible by a mesh axis) name their input-channel
axis "embed" instead, or nothing (the 1x1 quant convs).

``LatentCodec`` wraps a model and its params as the encoder/decoder interface
a latent-diffusion task uses: images in [-1, 1] <-> scaled latents.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from multimodal.models import layers

Dtype = Any

# diffusers clamps the posterior log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
GROUPNORM_EPS = 1e-6


def _conv(features: int, kernel: int, name: str, dtype: Dtype, *, stride: int = 1,
          padding="SAME", axes=(None, "embed")) -> nn.Conv:
  """Conv with named (in, out) channel axes; spatial kernel axes unnamed.
  Kernel (k, k, in, out), bias (out,)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                (None, None, *axes)),
                 bias_init=layers.partitioned(nn.initializers.zeros, (axes[1],)),
                 name=name)


def _group_norm(groups: int, name: str, dtype: Dtype) -> nn.GroupNorm:
  """torch GroupNorm semantics (exact two-pass variance), params ("embed",)."""
  return nn.GroupNorm(num_groups=groups, epsilon=GROUPNORM_EPS, dtype=dtype,
                      param_dtype=jnp.float32, use_fast_variance=False,
                      scale_init=layers.partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                      name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without a time embedding (temb_channels=None)."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a GroupNorm in
  front and the residual added (diffusers' Attention as built by
  UNetMidBlock2D for the VAE). Softmax in float32."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, c)

    def dense(name):
      return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                     (None, "embed")),
                      bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                      name=name)

    q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / jnp.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = dense("to_out")(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnet -> (attention) -> resnet at the lowest resolution."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Pad one row/column at the bottom/right, then a 3x3 stride-2 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
  """diffusers DownEncoderBlock2D: ``num_layers`` resnets, then (except in the
  last block) a Downsample."""
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """diffusers UpDecoderBlock2D: ``num_layers`` resnets, then (except in the
  last block) an Upsample."""
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in) -> (B, H/f, W/f, 2 * latent_channels) moments,
  f = 2**(len(block_out_channels) - 1). No quant_conv (AutoencoderKL has it)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans, groups = self.block_out_channels, self.norm_num_groups
    x = _conv(chans[0], 3, "conv_in", self.dtype)(jnp.asarray(x, self.dtype))
    for i, c in enumerate(chans):
      x = DownBlock(c, self.layers_per_block, groups, i < len(chans) - 1, self.dtype,
                    name=f"down_blocks_{i}")(x)
    x = MidBlock(groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(groups, "conv_norm_out", self.dtype)(x))
    return _conv(2 * self.latent_channels, 3, "conv_out", self.dtype, axes=("embed", None))(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    chans, groups = list(reversed(self.block_out_channels)), self.norm_num_groups
    x = _conv(chans[0], 3, "conv_in", self.dtype)(jnp.asarray(z, self.dtype))
    x = MidBlock(groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpBlock(c, self.layers_per_block + 1, groups, i < len(chans) - 1, self.dtype,
                  name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(groups, "conv_norm_out", self.dtype)(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype, axes=("embed", None))(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D), NHWC.

  ``encode(x) -> (mean, logvar)`` and ``decode(z) -> x`` are separate methods
  (``model.apply(variables, x, method=AutoencoderKL.encode)``); ``__call__``
  reconstructs through the posterior mean and exists so that ``init`` creates
  every parameter. Images are in [-1, 1]; latents are UNSCALED here (see
  LatentCodec for the diffusion model's scaled latents).
  """
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must all be "
                         f"multiples of norm_num_groups={self.norm_num_groups}")
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    moments = 2 * self.latent_channels
    if self.use_quant_conv:
      self.quant_conv = _conv(moments, 1, "quant_conv", self.dtype, axes=(None, None))
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, "post_quant_conv", self.dtype,
                                   axes=(None, None))

  @property
  def downsample_factor(self) -> int:
    return 2**(len(self.block_out_channels) - 1)

  def encode(self, x):
    """Images (B, H, W, in_channels) -> posterior (mean, logvar), each
    (B, H/f, W/f, latent_channels), float32 whatever the compute dtype."""
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
    z = jnp.asarray(z, self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


@flax.struct.dataclass
class LatentCodec:
  """The VAE as a latent-diffusion task sees it: images <-> diffusion latents.

    latents = (z - shift_factor) * scale_factor,  z ~ posterior(images)

  with scale_factor 0.18215 for Stable Diffusion's VAEs (sd-vae-ft-ema /
  -mse), which makes the latents roughly unit-variance; decode() undoes the
  scaling first. A pytree (params are leaves, the model and factors static),
  so a codec can be passed into jitted functions as an argument instead of
  being baked into the program as constants; its methods are pure and
  jittable either way.
  """
  model: AutoencoderKL = flax.struct.field(pytree_node=False)
  params: Any
  scale_factor: float = flax.struct.field(pytree_node=False, default=0.18215)
  shift_factor: float = flax.struct.field(pytree_node=False, default=0.0)

  def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H, W, C) image -> (H/f, W/f, latent_channels)."""
    h, w = image_shape[0], image_shape[1]
    f = self.model.downsample_factor
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's factor {f}")
    return (h // f, w // f, self.model.latent_channels)

  def encode(self, images, rng=None, *, noise=None):
    """Images (B, H, W, 3) in [-1, 1] -> scaled latents. With ``rng`` (or
    the standard normal ``noise`` itself, latent-shaped) a sample of the
    posterior (what DiT trains on: latent_dist.sample()); else its mean."""
    mean, logvar = self.model.apply({"params": self.params}, images,
                                    method=AutoencoderKL.encode)
    z = mean
    if noise is None and rng is not None:
      noise = jax.random.normal(rng, mean.shape, mean.dtype)
    if noise is not None:
      z = mean + jnp.exp(0.5 * logvar) * noise
    return (z - self.shift_factor) * self.scale_factor

  def decode(self, latents):
    """Scaled latents -> images (B, H, W, 3), nominally in [-1, 1] (unclipped)."""
    z = jnp.asarray(latents, jnp.float32) / self.scale_factor + self.shift_factor
    return self.model.apply({"params": self.params}, z, method=AutoencoderKL.decode)
