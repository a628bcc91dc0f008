"""Gaussian diffusion maths for a DiT denoiser (after DiT's diffusion/, itself
from OpenAI's improved-diffusion and guided-diffusion), in JAX.

The denoiser is any function ``model_fn(x_t, t) -> output``, so nothing here
depends on model code. Arrays are channels-last (NHWC, like the rest of this
codebase): a model that learns its variance returns 2C channels on the last
axis, the mean prediction first.

  schedules    betas, the derived float64 tables, q(x_t | x_0), the posterior,
               eps / x0 / v conversions and timestep respacing.
  model_output how raw model output becomes p(x_{t-1} | x_t).
  losses       the DiT training loss (MSE + learned-variance VLB).
  samplers     DDPM and DDIM as one jax.lax.scan each; classifier-free guidance.
"""
