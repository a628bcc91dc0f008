"""The DiT training loss: MSE on the model's target, plus, when the variance is
learnt, the variational bound on that variance alone (improved-diffusion's
hybrid loss, as DiT trains it).

DiT's create_diffusion defaults (learn_sigma=True, rescale_learned_sigmas=False,
use_kl=False) give LossType.MSE, so loss = mse + vb with vb NOT rescaled.
improved-diffusion's RESCALED_MSE multiplies vb by T / 1000; that is
``rescale_vb=True`` here, off by default to match DiT (with DiT's T = 1000 the
two agree anyway).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.diffusion import model_output, schedules
from multimodal.diffusion.schedules import DiffusionSchedule


def mean_flat(x):
  """Mean over every non-batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of Phi that improved-diffusion's numbers rely on."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log P(x) in nats, elementwise, for x = uint8 data rescaled to [-1, 1].

  Each value owns a bin of width 2/255; the edge bins extend to +-infinity.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: DiffusionSchedule, model_out, x0, x_t, t, *,
                 prediction: str = "epsilon", learn_sigma: bool = True,
                 clip_denoised: bool = False, variance: str = "fixed_large"):
  """One term of the VLB per example, in bits per dim: the decoder NLL at
  t == 0, KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) elsewhere."""
  true_mean, _, true_log_variance = schedules.q_posterior_mean_variance(
      schedule, x0, x_t, t)
  out = model_output.p_mean_variance(
      schedule, model_out, x_t, t, prediction=prediction,
      learn_sigma=learn_sigma, clip_denoised=clip_denoised, variance=variance)
  kl = mean_flat(normal_kl(true_mean, true_log_variance,
                           out["mean"], out["log_variance"])) / np.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / np.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl)


def training_losses(schedule: DiffusionSchedule, model_fn, x0, t, noise, *,
                    prediction: str = "epsilon", learn_sigma: bool = False,
                    rescale_vb: bool = False, timestep_map=None):
  """Per-example losses for one timestep per example.

  Args:
    model_fn: (x_t, t) -> output, [..., C] or [..., 2C] if learn_sigma.
    x0: clean data [B, ..., C]; t: int [B] indexing ``schedule``; noise: like x0.
    prediction: the model's target: "epsilon" (noise), "v", or "x0".
    learn_sigma: the output's second half sets the variance (LEARNED_RANGE),
      trained through the VLB only.
    rescale_vb: multiply vb by T / 1000 (improved-diffusion's RESCALED_MSE).
    timestep_map: for a respaced schedule, the model sees timestep_map[t].
  Returns:
    dict of float32 [B]: loss, mse, vb (zeros unless learn_sigma).
  """
  x_t = schedules.q_sample(schedule, x0, t, noise)
  model_t = t if timestep_map is None else jnp.asarray(timestep_map)[t]
  out = model_fn(x_t, model_t)
  mean_out, var_values = model_output.split_model_output(out, x_t, learn_sigma)

  if prediction == "epsilon":
    target = noise
  elif prediction == "v":
    target = schedules.v_from_x0_eps(schedule, x0, t, noise)
  elif prediction == "x0":
    target = x0
  else:
    raise ValueError(f"Unknown prediction {prediction!r}; "
                     f"valid: {model_output.PREDICTIONS}.")
  mse = mean_flat((target - mean_out).astype(jnp.float32) ** 2)

  if learn_sigma:
    # The VLB trains the variance only: the mean half of the output is frozen
    # (improved-diffusion's frozen_out), so the MSE alone shapes the mean.
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
    vb = vb_terms_bpd(schedule, frozen.astype(jnp.float32), x0.astype(jnp.float32),
                      x_t.astype(jnp.float32), t, prediction=prediction,
                      learn_sigma=True, clip_denoised=False)
    if rescale_vb:
      vb = vb * (schedule.num_timesteps / 1000.0)
  else:
    vb = jnp.zeros_like(mse)
  return dict(loss=mse + vb, mse=mse, vb=vb)
