"""Analytic model FLOPs of the models and tasks in this codebase.

Convention (MaxText's):
  * A matmul [m, k] x [k, n] costs 2*m*k*n FLOPs; a convolution costs
    2 * output positions * kh * kw * c_in * c_out.
  * Counted: every Dense, Conv and einsum on the forward path, including
    attention's two matmuls, QK^T and the weighted sum of V, each
    2 * T_q * T_k * heads * head_dim per sequence and layer. They are counted
    in full even under a causal or prefix mask (MaxText's older convention:
    no halving for causality), because the code computes them in full.
  * Not counted: elementwise ops, norms, softmax, embedding lookups (gathers).
  * Training FLOPs per step = 3 x forward (forward 1x, backward 2x). These are
    *model* FLOPs: the recomputation of remat, the second forward of CLIP's
    gradient accumulation, and backward passes that XLA drops for frozen
    parameters (config.freeze, DiT's stop-gradient text encoder) are not
    taken into account: everything on the forward path counts 3x.

What each task's forward contains is read from the model code:
  clip  image tower + text tower, with their out_dim projections, per
        example; plus the contrastive logits [B, D] x [D, B], per batch.
  dit   the DiT (patchify, timestep MLP, adaLN Dense layers, blocks, final
        layer) on pixels, or on VAE latents (the frozen VAE encoder is
        data preprocessing here, as in DiT's Gflops, and is NOT counted);
        with text conditioning also the frozen CLIP text tower.
  vlm   ViT (no pooling, no head) + projector + decoder LM over image
        tokens + text; the LM head runs over every position, image tokens
        included, because the model computes those logits.
  classify  ViT + one Dense head per label.

`jaxpr_matmul_flops` counts the same thing independently, from the
dot_general and conv_general_dilated equations of a traced function.
"""
from __future__ import annotations

import math
import os

import jax
import jax.extend.core as jex_core

from multimodal.models import decoder, dit, text, two_towers, vit, vlm

# The tasks feed RGB images (their init uses (1, size, size, 3)).
IMAGE_CHANNELS = 3


# --------------------------------------------------------------------------
# Building blocks: FLOPs of one example (one sequence), as Python ints.


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
  """A Dense (or projection einsum) applied to `tokens` vectors."""
  return 2 * tokens * d_in * d_out


def conv_flops(out_positions: int, kh: int, kw: int, c_in: int, c_out: int) -> int:
  """A convolution; padded positions cost like any other (XLA computes them)."""
  return 2 * out_positions * kh * kw * c_in * c_out


def attention_flops(tokens: int, width: int, num_heads: int, head_dim: int,
                    kv_heads: int | None = None, kv_tokens: int | None = None) -> int:
  """Multi-head (or grouped-query) attention: q/k/v/out projections plus
  QK^T and weights @ V. `kv_tokens` (default `tokens`) is the length of the
  sequence keys and values are projected from and attended over (cross
  attention, MAP pooling); `kv_heads` (default `num_heads`) shrinks only the
  K/V projections: every query head still attends."""
  kv_heads = num_heads if kv_heads is None else kv_heads
  kv_tokens = tokens if kv_tokens is None else kv_tokens
  q = dense_flops(tokens, width, num_heads * head_dim)
  kv = 2 * dense_flops(kv_tokens, width, kv_heads * head_dim)
  scores = 2 * tokens * kv_tokens * num_heads * head_dim  # QK^T
  mix = 2 * tokens * kv_tokens * num_heads * head_dim  # weights @ V
  out = dense_flops(tokens, num_heads * head_dim, width)
  return q + kv + scores + mix + out


def mlp_flops(tokens: int, width: int, mlp_dim: int, gated: bool = False) -> int:
  """Dense-act-Dense (2 matrices) or a gated MLP such as SwiGLU (3)."""
  return (3 if gated else 2) * dense_flops(tokens, width, mlp_dim)


def transformer_block_flops(tokens: int, width: int, mlp_dim: int, num_heads: int,
                            head_dim: int, kv_heads: int | None = None, gated: bool = False,
                            kv_tokens: int | None = None) -> int:
  """Attention + MLP of one block (norms and residuals are elementwise)."""
  return (attention_flops(tokens, width, num_heads, head_dim, kv_heads, kv_tokens)
          + mlp_flops(tokens, width, mlp_dim, gated))


# --------------------------------------------------------------------------
# Models. Each takes the module's own kwargs (dicts as the tasks build them)
# and resolves sizes through the module's _config(), so variant tables and
# their override rules live only in the model files.


def _pair(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _encoder_flops(depth: int, tokens: int, width: int, mlp_dim: int, num_heads: int,
                   last_block_pooled_only: bool) -> int:
  """layers.Encoder: `depth` blocks over `tokens`; with
  last_block_pooled_only, the last one computes one query (keys and values
  are still projected from every token)."""
  block = lambda queries: transformer_block_flops(
      queries, width, mlp_dim, num_heads, width // num_heads, kv_tokens=tokens)
  if last_block_pooled_only:
    return (depth - 1) * block(tokens) + block(1)
  return depth * block(tokens)


def _vit_tokens(model: vit.ViT, cfg: dict, image_size) -> tuple[int, int]:
  """(patches, encoder sequence length) of a ViT on image_size."""
  h, w = _pair(image_size)
  ph, pw = cfg["patch_size"]
  patches = (h // ph) * (w // pw)  # VALID patchify conv: floor.
  return patches, patches + (model.pool_type == "tok")  # + the cls token.


def vit_num_tokens(tower: dict, image_size) -> int:
  """Tokens the encoder of a ViT (vit.ViT kwargs) sees: patches (+1 cls)."""
  model = vit.ViT(**tower)
  return _vit_tokens(model, model._config(), image_size)[1]


def _conv_stem_flops(width: int, patch_size, h: int, w: int, channels: int) -> int:
  """vit.ConvStem: log2(p) stride-2 3x3 convs, a 1x1 conv to the width, and
  a linear patchify of the raw pixels beside them."""
  ph, pw = patch_size
  num_convs = ph.bit_length() - 1
  flops, c_in, oh, ow = 0, channels, h, w
  for i in range(num_convs):
    c_out = max(16, width // 2 ** (num_convs - 1 - i))  # As ConvStem.
    oh, ow = -(-oh // 2), -(-ow // 2)  # Stride 2, SAME padding: ceil.
    flops += conv_flops(oh * ow, 3, 3, c_in, c_out)
    c_in = c_out
  flops += conv_flops(oh * ow, 1, 1, c_in, width)  # "embedding"
  flops += conv_flops((h // ph) * (w // pw), ph, pw, channels, width)  # "patch_embedding"
  return flops


def vit_flops(tower: dict, image_size, channels: int = IMAGE_CHANNELS) -> int:
  """One image through vit.ViT(**tower): stem, encoder, pooling head (MAP),
  and the Dense head when num_classes is set."""
  model = vit.ViT(**tower)
  cfg = model._config()
  width, depth, heads = cfg["width"], cfg["depth"], cfg["num_heads"]
  mlp_dim = cfg["mlp_dim"] or 4 * width  # As MlpBlock.
  h, w = _pair(image_size)
  patches, tokens = _vit_tokens(model, cfg, image_size)
  ph, pw = cfg["patch_size"]
  if model.stem == "patch":
    flops = conv_flops(patches, ph, pw, channels, width)
  elif model.stem == "conv":
    flops = _conv_stem_flops(width, (ph, pw), h, w, channels)
  else:
    raise ValueError(f"Unknown stem {model.stem!r}")
  flops += _encoder_flops(depth, tokens, width, mlp_dim, heads, model.last_block_pooled_only)
  if model.pool_type == "map":  # One learned probe attends over every token.
    flops += transformer_block_flops(1, width, mlp_dim, heads, width // heads,
                                     kv_tokens=tokens)
  if model.num_classes:
    # The head sees the pooled vector, or every token for pool_type="none".
    head_tokens = tokens if model.pool_type == "none" else 1
    flops += dense_flops(head_tokens, width, model.num_classes)
  return flops


def text_flops(tower: dict, length: int) -> int:
  """One sequence of `length` tokens through text.TextTransformer(**tower)
  (the embedding is a gather; pooling is a gather or a masked mean)."""
  model = text.TextTransformer(**{"vocab_size": 0, **tower})  # vocab: gathers only.
  cfg = model._config()
  width, heads = cfg["width"], cfg["num_heads"]
  mlp_dim = cfg["mlp_dim"] or 4 * width
  flops = _encoder_flops(cfg["depth"], length, width, mlp_dim, heads,
                         model.last_block_pooled_only)
  if model.num_classes:
    flops += dense_flops(1, width, model.num_classes)
  return flops


def decoder_flops(lm: dict, length: int) -> int:
  """One sequence through decoder.Decoder(**lm) (kwargs incl. vocab_size):
  GQA attention, SwiGLU MLPs and the vocabulary projection of every
  position (tied or not, the same matmul)."""
  model = decoder.Decoder(**lm)
  cfg = model._config()
  width = cfg["width"]
  block = transformer_block_flops(length, width, cfg["mlp_dim"], cfg["num_heads"],
                                  cfg["head_dim"], kv_heads=cfg["num_kv_heads"], gated=True)
  return cfg["depth"] * block + dense_flops(length, width, model.vocab_size)


def dit_flops(model_kwargs: dict, image_shape, text_len: int | None = None) -> int:
  """One (H, W, C) input through dit.DiT(**model_kwargs), conditioning
  inputs given (a pooled text embedding when text_dim is set, `text_len`
  text tokens when cross_attention). The label embedding is a gather and the
  sinusoidal timestep features are elementwise."""
  model = dit.DiT(**model_kwargs)
  cfg = model._config()
  width, heads, (ph, pw) = cfg["width"], cfg["num_heads"], cfg["patch_size"]
  h, w, c = image_shape
  patches = (h // ph) * (w // pw)
  out_channels = 2 * c if model.learn_sigma else c
  freq_dim = dit.TimestepEmbedder.frequency_embedding_size  # DiT builds it with the default.

  flops = conv_flops(patches, ph, pw, c, width)  # x_embedder
  flops += dense_flops(1, freq_dim, width) + dense_flops(1, width, width)  # t_embedder
  if model.text_dim is not None:
    flops += dense_flops(1, model.text_dim, width)  # text_embedder
  context = None
  if model.cross_attention:
    if text_len is None:
      raise ValueError("cross_attention counts need text_len")
    token_dim = model.text_token_dim or model.text_dim
    flops += dense_flops(text_len, token_dim, width)  # text_tokens_embedder
    context = 1 + text_len  # A learned null token goes in front.

  block = (dense_flops(1, width, 6 * width)  # adaLN_modulation
           + transformer_block_flops(patches, width, int(width * model.mlp_ratio), heads,
                                     width // heads))
  if context is not None:
    block += (dense_flops(1, width, 3 * width)  # adaLN_modulation_cross
              + attention_flops(patches, width, heads, width // heads, kv_tokens=context))
  flops += cfg["depth"] * block
  flops += dense_flops(1, width, 2 * width)  # final_layer/adaLN_modulation
  flops += dense_flops(patches, width, ph * pw * out_channels)  # final_layer/linear
  return flops


# --------------------------------------------------------------------------
# Tasks: what a config trains.


def _as_dict(d) -> dict:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _run_config(run):
  """The config of a run another run refers to ({"workdir", "config"}): the
  workdir's saved one, else the config file's (nothing is trained here)."""
  from multimodal.config import config_lib
  if run.get("workdir"):
    return config_lib.load_workdir_config(run["workdir"])
  return config_lib.load_config_file(run["config"])


def _text_tower(clip_config) -> dict:
  """The text tower kwargs of a CLIP config, as TwoTowers builds them."""
  return two_towers.tower_kwargs(_as_dict(clip_config.model.text),
                                 clip_config.model.out_dim, None)


def _clip_forward(config, batch_size: int) -> int:
  out_dim = config.model.out_dim
  image = two_towers.tower_kwargs(_as_dict(config.model.image), out_dim, None)
  per_example = (vit_flops(image, config.input.image_size)
                 # The task feeds tokens of exactly tokenizer.max_len.
                 + text_flops(_text_tower(config), config.input.tokenizer.max_len))
  # Softmax and sigmoid (dense or ring) score all B x B pairs: [B, D] x [D, B].
  logits = 2 * batch_size * batch_size * out_dim
  return batch_size * per_example + logits


def _dit_forward(config, batch_size: int) -> int:
  m = config.model
  size = config.input.image_size
  image_shape = (size, size, IMAGE_CHANNELS)
  vae_dir = config.get("vae", {}).get("from_diffusers")
  if vae_dir:  # Latent diffusion: the DiT denoises the VAE's latents.
    from multimodal.importers import diffusers_vae, safetensors_io
    vae = diffusers_vae.vae_kwargs_from_config(safetensors_io.read_config(vae_dir))
    f = 2 ** (len(vae["block_out_channels"]) - 1)  # As AutoencoderKL.downsample_factor.
    image_shape = (size // f, size // f, vae["latent_channels"])
  kwargs = dict(variant=m.variant, learn_sigma=m.learn_sigma)
  per_example, text_len = 0, None
  if m.get("conditioning", "class") == "text":
    clip_config = _run_config(m.text_encoder)
    # As tasks/text_encoder.py builds it: every token encoded, not only the pooled.
    tower = two_towers.every_token_encoded(_text_tower(clip_config))
    text_len = clip_config.input.tokenizer.max_len
    width = text.TextTransformer(**{"vocab_size": 0, **tower})._config()["width"]
    kwargs.update(num_classes=None, text_dim=clip_config.model.out_dim,
                  cross_attention=m.get("cross_attention", False), text_token_dim=width)
    per_example += text_flops(tower, text_len)  # The frozen text encoder.
  else:
    kwargs.update(num_classes=m.num_classes)
  # The loss calls the model once per example (diffusion/losses.py).
  per_example += dit_flops(kwargs, image_shape, text_len)
  return batch_size * per_example


def _vlm_vocab_size(config) -> int:
  tok = config.input.tokenizer
  if tok.get("model"):  # A given SentencePiece model decides the vocabulary.
    from multimodal.data import tokenizer as tokenizer_lib
    return tokenizer_lib.Tokenizer(tok.model).vocab_size
  return tok.vocab_size


def _vlm_forward(config, batch_size: int) -> int:
  hf_lm = config.get("init", {}).get("from_hf")
  if hf_lm:  # The checkpoint's architecture, as the task does.
    from multimodal.importers import hf_llama, safetensors_io
    lm = hf_llama.decoder_kwargs_from_config(
        safetensors_io.read_json_object(os.path.join(hf_lm, "config.json")))
  else:
    lm = {**_as_dict(config.model.lm), "vocab_size": _vlm_vocab_size(config)}
  # The loss feeds text[:, :-1]: the targets are the same tokens shifted.
  length = config.input.max_len - 1
  per_example = 0
  if config.stage != "lm":  # Stage "lm" is the text-only LM.
    vision = _run_config(config.model.vision)
    image = two_towers.every_token_encoded(  # As vlm.VisionLanguageModel.
        {**_as_dict(vision.model.image), "num_classes": None, "pool_type": "none"})
    image.pop("projection", None)  # A TwoTowers key, not a ViT field.
    size = vision.input.image_size
    vision_width = vit.ViT(**image)._config()["width"]
    lm_width = decoder.Decoder(**lm)._config()["width"]
    num_image = vit_num_tokens(image, size)
    per_example += vit_flops(image, size)
    # The projector's first layer: Dense_0, or Conv_0 (3x3 taps per token),
    # over the chosen layer's features, and the stem's beside them if asked.
    taps = 9 if config.model.projector == "conv" else 1
    features = vision_width * (2 if config.model.get("stem_features") else 1)
    per_example += dense_flops(num_image, taps * features, lm_width)
    if config.model.projector == "block":  # vlm.Projector's: a 4x MLP (MlpBlock's).
      per_example += transformer_block_flops(num_image, lm_width, 4 * lm_width,
                                             vlm.BLOCK_HEADS, lm_width // vlm.BLOCK_HEADS)
    if config.model.projector in ("mlp", "conv", "block"):
      per_example += dense_flops(num_image, lm_width, lm_width)  # Projector Dense_1
    length += num_image
  per_example += decoder_flops(lm, length)
  return batch_size * per_example


def _classify_forward(config, batch_size: int) -> int:
  image = {**_as_dict(config.model.image), "num_classes": None}
  width = vit.ViT(**image)._config()["width"]
  heads = sum(dense_flops(1, width, n) for n in dict(config.model.heads).values())
  return batch_size * (vit_flops(image, config.input.image_size) + heads)


_FORWARD = {"clip": _clip_forward, "dit": _dit_forward, "vlm": _vlm_forward,
            "classify": _classify_forward}


def forward_flops(config, batch_size: int) -> float:
  """Forward matmul FLOPs of config.task's training loss on `batch_size`
  examples (clip covers SigLIP too: another loss, the same matmuls)."""
  if config.task not in _FORWARD:
    raise ValueError(f"no FLOP count for config.task={config.task!r}; "
                     f"known: {sorted(_FORWARD)}.")
  return float(_FORWARD[config.task](config, batch_size))


def train_step_flops(config) -> float:
  """Training FLOPs of one step on the global batch config.input.batch_size:
  3 x forward (MaxText's convention; see the module docstring)."""
  return 3 * forward_flops(config, config.input.batch_size)


# --------------------------------------------------------------------------
# An independent count from the traced program.


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _count_jaxpr(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      # Each output element contracts the kernel over all but its output
      # feature dimension (kh * kw * c_in / feature groups).
      rhs = eqn.invars[1].aval.shape
      out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature]
    subs = [_count_jaxpr(j) for j in _subjaxprs(eqn.params)]
    if name == "cond":  # One branch runs; take the dearest.
      total += max(subs, default=0)
    elif name == "while" and any(subs):
      raise ValueError("a while loop with matmuls: its trip count is unknown")
    elif name == "scan":  # The body runs `length` times.
      total += eqn.params["length"] * sum(subs)
    else:  # pjit, remat, custom_jvp/vjp, shard_map, ...: once.
      total += sum(subs)
  return total


def jaxpr_matmul_flops(fn, *args, **kwargs) -> int:
  """2 * (output size) * (contracted size) summed over every dot_general and
  conv_general_dilated that `fn(*args, **kwargs)` traces to, recursing into
  nested jaxprs (jit, remat, custom_vjp, scan x length, ...). Arguments may
  be jax.ShapeDtypeStruct: nothing is computed or compiled."""
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return _count_jaxpr(closed.jaxpr)
