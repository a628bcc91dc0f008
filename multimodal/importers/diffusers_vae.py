"""diffusers ``AutoencoderKL`` weights -> our ``vae.AutoencoderKL``.

vae.py mirrors diffusers' module names, so the mapping is mechanical: a torch
key ``encoder.down_blocks.0.resnets.1.conv1.weight`` becomes
``encoder/down_blocks_0/resnets_1/conv1/kernel`` (list index -> ``_i``), with
conv weights (O, I, kh, kw) -> (kh, kw, I, O), Linear weights transposed and
GroupNorm ``weight`` -> ``scale``. The one naming quirk is the mid-block
attention: current diffusers names it to_q / to_k / to_v / to_out.0, while
older saved VAEs (e.g. early sd-vae-ft-* uploads) use query / key / value /
proj_attn, sometimes as (C, C, 1, 1) conv weights; all of them map to our
to_q / to_k / to_v / to_out Dense layers.

Scaling fields of the config (scaling_factor, shift_factor) are not part of
the network; ``load_codec`` reads them into a LatentCodec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.importers import safetensors_io as io
from multimodal.importers.safetensors_io import WeightImportError
from multimodal.models import vae

# Older diffusers attention names -> current ones.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out",
                    "to_out": "to_out"}


def _field(cfg: dict, field: str, ok, want: str, default=None):
  return io.require_field(cfg, field, ok, want, default, source="diffusers AutoencoderKL",
                          target="vae.AutoencoderKL")


def vae_kwargs_from_config(cfg: dict) -> dict:
  """diffusers AutoencoderKL config.json -> vae.AutoencoderKL(**kwargs).
  Missing fields take diffusers' defaults; unsupported ones raise
  WeightImportError naming the field."""
  name = cfg.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise WeightImportError(
        f"config _class_name={name!r} is not 'AutoencoderKL'; point at the pipeline's "
        "'vae' folder.")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  is_bool = lambda v: isinstance(v, bool)
  groups = _field(cfg, "norm_num_groups", is_int, "a positive int", 32)
  chans = _field(cfg, "block_out_channels",
                 lambda v: isinstance(v, (list, tuple)) and v and all(
                     is_int(c) and c % groups == 0 for c in v),
                 f"a non-empty list of multiples of norm_num_groups={groups}", (64,))
  n = len(chans)
  _field(cfg, "down_block_types", lambda v: list(v) == ["DownEncoderBlock2D"] * n,
         f"= {n} x 'DownEncoderBlock2D' (one per block_out_channels entry)",
         ("DownEncoderBlock2D",))
  _field(cfg, "up_block_types", lambda v: list(v) == ["UpDecoderBlock2D"] * n,
         f"= {n} x 'UpDecoderBlock2D'", ("UpDecoderBlock2D",))
  _field(cfg, "act_fn", lambda v: v in ("silu", "swish"), "= 'silu'", "silu")
  return dict(
      block_out_channels=tuple(chans),
      layers_per_block=_field(cfg, "layers_per_block", is_int, "a positive int", 1),
      latent_channels=_field(cfg, "latent_channels", is_int, "a positive int", 4),
      norm_num_groups=groups,
      in_channels=_field(cfg, "in_channels", is_int, "a positive int", 3),
      out_channels=_field(cfg, "out_channels", is_int, "a positive int", 3),
      use_quant_conv=_field(cfg, "use_quant_conv", is_bool, "a bool", True),
      use_post_quant_conv=_field(cfg, "use_post_quant_conv", is_bool, "a bool", True),
      mid_block_add_attention=_field(cfg, "mid_block_add_attention", is_bool, "a bool", True))


def expected_params(kwargs: dict):
  """vae.AutoencoderKL's parameter tree as shapes (nothing allocated)."""
  model = vae.AutoencoderKL(**kwargs)
  f = model.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, kwargs["in_channels"]), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def _path(key: str) -> list[str]:
  """'encoder.mid_block.attentions.0.to_out.0.weight' -> [encoder, mid_block,
  attentions_0, to_out, weight]: list indices join their list's name."""
  parts: list[str] = []
  for part in key.split("."):
    if part.isdigit() and parts:
      if parts[-1] == "to_out":  # ModuleList [Linear, Dropout]: ours is the Linear.
        continue
      parts[-1] = f"{parts[-1]}_{part}"
    elif parts and parts[-1].startswith("attentions_") and part in LEGACY_ATTENTION:
      parts.append(LEGACY_ATTENTION[part])
    else:
      parts.append(part)
  return parts


def convert_vae(state_dict, cfg: dict) -> dict:
  """diffusers AutoencoderKL state dict -> our params (nested dict of float32
  numpy arrays), checked against vae.AutoencoderKL's own parameter tree."""
  kwargs = vae_kwargs_from_config(cfg)
  out: dict[str, np.ndarray] = {}
  for key in sorted(state_dict):
    value = np.asarray(state_dict[key], np.float32)
    *module, leaf = _path(key)
    if leaf == "bias":
      name = "bias"
    elif leaf == "weight" and value.ndim == 1:
      name = "scale"  # GroupNorm.
    elif leaf == "weight" and any(m.startswith("attentions_") for m in module):
      name, value = "kernel", io.linear(value)
    elif leaf == "weight" and value.ndim == 4:
      name, value = "kernel", io.conv(value)
    else:
      raise WeightImportError(
          f"diffusers VAE checkpoint tensor {key} {value.shape} is not a conv, Linear, "
          "GroupNorm or bias parameter; is this an AutoencoderKL checkpoint?")
    path = "/".join([*module, name])
    if path in out:
      raise WeightImportError(f"diffusers VAE checkpoint maps two tensors onto {path} "
                              f"(the second is {key}): mixed old and new attention names?")
    out[path] = value
  params = io.unflatten(out)
  io.check_tree(params, expected_params(kwargs), "diffusers AutoencoderKL weights")
  return params


def load_vae(directory: str) -> tuple[dict, dict]:
  """(vae.AutoencoderKL kwargs, params) from a local diffusers AutoencoderKL
  directory, e.g. a download of stabilityai/sd-vae-ft-ema."""
  cfg, state = io.read_model_dir(directory)
  return vae_kwargs_from_config(cfg), convert_vae(state, cfg)


def load_codec(directory: str, scale_factor: float | None = None) -> vae.LatentCodec:
  """A LatentCodec from a diffusers VAE directory. ``scale_factor`` defaults
  to the config's scaling_factor (0.18215 for Stable Diffusion's VAEs), the
  shift to its shift_factor (None -> 0)."""
  cfg = io.read_config(directory)
  for field in ("latents_mean", "latents_std"):
    if cfg.get(field) is not None:
      raise WeightImportError(
          f"diffusers AutoencoderKL config sets {field}: per-channel latent "
          "normalisation is not supported by LatentCodec (only scale and shift).")
  kwargs, params = load_vae(directory)
  scale = scale_factor if scale_factor is not None else cfg.get("scaling_factor", 0.18215)
  return vae.LatentCodec(vae.AutoencoderKL(**kwargs), jax.tree.map(jnp.asarray, params),
                         scale_factor=float(scale),
                         shift_factor=float(cfg.get("shift_factor") or 0.0))
