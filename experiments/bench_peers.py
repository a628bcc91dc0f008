"""PyTorch "peers" for experiments/bench.py: the same unit of work as one of
our jitted JAX steps, written with transformers / diffusers on CPU torch.

Every peer is a factory: it takes the shape parameters, builds the model
(random weights: speed does not depend on them, torch.manual_seed(0)), the
optimizer and FIXED random inputs once, and returns a zero-argument callable
(``llama_generate``: a callable of n) that runs ONE unit of work
synchronously (CPU torch is synchronous):

  clip_train_step -> one CLIPModel training step        returns the loss (float)
  clip_embed_images -> one batch of image embeddings    returns them (np)
  dit_train_step  -> one DiTTransformer2DModel step     returns the loss (float)
  dit_sample_loop -> a whole DDIM + CFG sampling loop   returns the samples (np)
  llama_generate  -> (n) one greedy generate() of n new tokens, returns (B, n) np

The training callables carry ``.model`` and ``.optimizer`` attributes (for
tests that check that a step changes the parameters); the sampler carries
``.model`` and ``.scheduler``. Everything is float32; torch's thread count is
left at its default (both cores, as XLA uses them).

Known differences from our models (the peers are the stock HF/diffusers
architectures, sized like ours; see also each factory's docstring):

  * CLIP: HF's CLIP is OpenAI CLIP: quick_gelu MLPs (ours default gelu_tanh),
    a pre-LayerNorm after the vision embeddings (ours: pre_norm=False), a cls
    token with post-LN pooling, a causal text tower pooled at the first EOS,
    bias-free patch conv and projections, logit scale exp(2.6592) unclamped
    with the softmax (InfoNCE) loss. AdamW decays EVERY parameter (our optax
    chain decays only the params its wd_mask selects).
  * DiT: diffusers keeps a separate timestep MLP + label table in EVERY block
    (depth copies; ours shares one), so it has more parameters and runs the
    timestep MLP depth + 1 times per forward; in train mode each block also
    drops labels to null independently (p = 0.1, hard-coded). The loss is
    the epsilon MSE only; with learn_sigma our loss adds DiT's VB term on the
    variance channels (a little more work for ours). Pre-MLP LN eps is set to
    1e-6 (ours; diffusers' default is 1e-5).
  * DiT sampling reproduces DiTPipeline's loop: the scheduler steps the
    DOUBLED batch (both halves carry the same guided eps) where ours steps B.
"""

from __future__ import annotations

import importlib.util

import numpy as np

_PACKAGES = ("torch", "transformers", "diffusers")


def available() -> bool:
  """True when torch, transformers and diffusers can all be imported."""
  return all(importlib.util.find_spec(p) is not None for p in _PACKAGES)


def torch_version() -> str:
  """'torch X, transformers Y, diffusers Z' (missing packages say so)."""
  from importlib import metadata
  parts = []
  for name in _PACKAGES:
    try:
      parts.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      parts.append(f"{name} (not installed)")
  return ", ".join(parts)


def matmul_flops(n: int, repeats: int) -> float:
  """torch's f32 [n, n] x [n, n] matmul, in FLOP/s (median of `repeats`)."""
  import statistics
  import time

  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times)


def _clip_grad_and_step(model, opt, loss):
  import torch
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------
# CLIP.


def clip_train_step(image_size, patch_size, width, depth, num_heads, mlp_dim, text_len,
                    vocab_size, out_dim, batch, lr=1e-3, weight_decay=1e-4):
  """One training step of transformers' CLIPModel (both towers width/depth/
  heads/mlp_dim, projection_dim=out_dim, hidden_act default quick_gelu) with
  torch AdamW and global-norm clipping 1.0. Returns a callable -> loss.

  Text: ids uniform in [1, vocab_size - 1) with the EOS id vocab_size - 1 in
  the last position of every row; the config's eos_token_id is vocab_size - 1
  (not the legacy 2), so CLIPTextModel pools at the first EOS, i.e. the last
  token (the legacy argmax rule would pick the same position: EOS is the
  largest id). Images: N(0, 1) pixel_values (batch, 3, H, W).
  """
  import torch
  import transformers

  if vocab_size < 3:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for text ids and EOS")
  eos = vocab_size - 1
  tower = dict(hidden_size=width, intermediate_size=mlp_dim, num_hidden_layers=depth,
               num_attention_heads=num_heads, projection_dim=out_dim)
  text = transformers.CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=text_len,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=eos, **tower)
  vision = transformers.CLIPVisionConfig(image_size=image_size, patch_size=patch_size,
                                         num_channels=3, **tower)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                   projection_dim=out_dim)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
  input_ids = torch.randint(1, eos, (batch, text_len))
  input_ids[:, -1] = eos
  pixel_values = torch.randn(batch, 3, image_size, image_size)

  def step() -> float:
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    _clip_grad_and_step(model, opt, out.loss)
    return float(out.loss.detach())

  step.model, step.optimizer = model, opt
  return step


def clip_embed_images(image_size, patch_size, width, depth, num_heads, mlp_dim, out_dim,
                      batch):
  """Evaluation's forward pass: transformers' CLIPModel.get_image_features
  on a fixed batch of N(0, 1) images under no_grad, in eval mode. Returns a
  callable -> the (batch, out_dim) embeddings as numpy."""
  import torch
  import transformers

  vision = transformers.CLIPVisionConfig(
      image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=width,
      intermediate_size=mlp_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
      projection_dim=out_dim)
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(vision).float().eval()
  pixel_values = torch.randn(batch, 3, image_size, image_size)

  def embed() -> np.ndarray:
    with torch.no_grad():
      return model(pixel_values=pixel_values).image_embeds.numpy()

  embed.model = model
  return embed


# --------------------------------------------------------------------------
# DiT.


def _dit_model(image_size, patch_size, in_channels, width, num_heads, depth, num_classes,
               learn_sigma):
  """diffusers' DiTTransformer2DModel with dit.DiT's shapes (the inverse of
  multimodal/importers/diffusers_dit.dit_kwargs_from_config)."""
  import torch
  from diffusers import DiTTransformer2DModel
  if width % num_heads:
    raise ValueError(f"width={width} is not a multiple of num_heads={num_heads}")
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
  torch.manual_seed(0)
  return DiTTransformer2DModel(
      num_attention_heads=num_heads, attention_head_dim=width // num_heads,
      in_channels=in_channels, out_channels=(2 if learn_sigma else 1) * in_channels,
      num_layers=depth, sample_size=image_size, patch_size=patch_size,
      num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero",
      activation_fn="gelu-approximate", attention_bias=True,
      norm_elementwise_affine=False, norm_eps=1e-6, dropout=0.0).float()


def dit_train_step(image_size, patch_size, in_channels, width, depth, num_heads, num_classes,
                   batch, learn_sigma=True, lr=1e-3, ema_decay=None):
  """One training step of diffusers' DiTTransformer2DModel (shapes as
  dit.DiT(width, depth, num_heads, patch_size, num_classes, learn_sigma) on
  (image_size, image_size, in_channels) inputs) with AdamW (torch default
  weight decay 0.01) and clipping 1.0. Fixed x0 ~ N(0, 1) and labels; per
  step it draws timesteps (uniform in [0, 1000)) and noise, noises x0 with a
  DDPMScheduler (1000 steps, squaredcos_cap_v2 = our cosine) and takes the
  MSE between the first in_channels output channels and the noise. With
  `ema_decay`, each step also updates diffusers' EMAModel of the weights
  (foreach, with the warm-up that ours uses too), as our step does when the
  config keeps a moving average. Returns a callable -> loss.
  """
  import torch
  import torch.nn.functional as F
  from diffusers import DDPMScheduler

  model = _dit_model(image_size, patch_size, in_channels, width, num_heads, depth, num_classes,
                     learn_sigma).train()
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
  opt = torch.optim.AdamW(model.parameters(), lr=lr)
  x0 = torch.randn(batch, in_channels, image_size, image_size)
  labels = torch.randint(0, num_classes, (batch,))
  steps = scheduler.config.num_train_timesteps
  ema = None
  if ema_decay is not None:
    from diffusers.training_utils import EMAModel
    ema = EMAModel(model.parameters(), decay=ema_decay, foreach=True)

  def step() -> float:
    t = torch.randint(0, steps, (batch,))
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, timestep=t, class_labels=labels).sample
    loss = F.mse_loss(out[:, :in_channels], noise)
    _clip_grad_and_step(model, opt, loss)
    if ema is not None:
      ema.step(model.parameters())
    return float(loss.detach())

  step.model, step.optimizer, step.ema = model, opt, ema
  return step


def dit_sample_loop(image_size, patch_size, in_channels, width, depth, num_heads, num_classes,
                    batch, steps, cfg_scale):
  """diffusers' DiTPipeline sampling loop without the VAE (pixel space):
  DDIMScheduler (1000 train steps, squaredcos_cap_v2, otherwise diffusers'
  defaults: clip_sample, "leading" spacing) for ``steps`` steps, classifier-
  free guidance on a doubled batch [labels, null = num_classes] when
  cfg_scale > 1, under no_grad. The callable runs the WHOLE loop from fixed
  initial noise and returns the samples (batch, in_channels, H, W) as numpy;
  divide its time by ``steps``.
  """
  import torch
  from diffusers import DDIMScheduler

  model = _dit_model(image_size, patch_size, in_channels, width, num_heads, depth, num_classes,
                     True).eval()
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
  guided = cfg_scale > 1
  latents = torch.randn(batch, in_channels, image_size, image_size)
  labels = torch.randint(0, num_classes, (batch,))
  # DiTPipeline hard-codes 1000 (ImageNet's null class); ours is num_classes.
  labels_input = torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels
  learned_sigma = model.config.out_channels // 2 == in_channels

  def sample() -> np.ndarray:
    with torch.no_grad():
      scheduler.set_timesteps(steps)
      x = torch.cat([latents] * 2) if guided else latents
      for t in scheduler.timesteps:
        if guided:
          half = x[: len(x) // 2]
          x = torch.cat([half, half], dim=0)
        x = scheduler.scale_model_input(x, t)
        timesteps = t[None].expand(x.shape[0])
        noise_pred = model(x, timestep=timesteps, class_labels=labels_input).sample
        if guided:
          eps, rest = noise_pred[:, :in_channels], noise_pred[:, in_channels:]
          cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
          half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
          eps = torch.cat([half_eps, half_eps], dim=0)
          noise_pred = torch.cat([eps, rest], dim=1)
        model_output = noise_pred[:, :in_channels] if learned_sigma else noise_pred
        x = scheduler.step(model_output, t, x).prev_sample
      if guided:
        x = x.chunk(2, dim=0)[0]
      return x.numpy()

  sample.model, sample.scheduler = model, scheduler
  return sample


# --------------------------------------------------------------------------
# Llama.


def llama_generate(width, mlp_dim, depth, num_heads, num_kv_heads, head_dim, vocab,
                   prompt: np.ndarray):
  """transformers' LlamaForCausalLM with our decoder's shapes (random weights)
  and the fixed (B, P) int prompt. The callable(n) runs one greedy
  ``generate`` of exactly n new tokens (min_new_tokens = max_new_tokens = n,
  under no_grad) and returns them, (B, n) int64 numpy. The EOS id is
  vocab - 1 (min_new_tokens keeps it from ending a row early)."""
  import torch
  import transformers

  prompt_len = int(np.shape(prompt)[-1])
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=mlp_dim, num_hidden_layers=depth,
      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
      max_position_embeddings=max(4096, 2 * prompt_len), pad_token_id=0,
      eos_token_id=vocab - 1)
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(config).float().eval()
  input_ids = torch.from_numpy(np.asarray(prompt)).long()
  # Every prompt position is real (as ours): an explicit mask keeps generate()
  # from inferring padding from pad_token_id.
  attention_mask = torch.ones_like(input_ids)

  def generate(n: int) -> np.ndarray:
    with torch.no_grad():
      out = llama.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False)
    return out[:, prompt_len:].numpy()

  generate.model = llama
  return generate
