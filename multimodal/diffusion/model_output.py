"""How a denoiser's raw output becomes p(x_{t-1} | x_t) (guided-diffusion's
p_mean_variance). Shared by the training loss (its VLB term) and the samplers,
so it lives in neither.

Output layout is channels-last: [..., C] for a fixed variance, [..., 2C] when
the variance is learnt (mean prediction first, then the variance values).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from multimodal.diffusion import schedules
from multimodal.diffusion.schedules import DiffusionSchedule, extract

PREDICTIONS = ("epsilon", "v", "x0")
# Used only when the variance is not learnt. DiT's create_diffusion picks
# FIXED_LARGE unless sigma_small=True (its default learn_sigma=True makes it
# LEARNED_RANGE), so "fixed_large" is the default here too.
VARIANCES = ("fixed_large", "fixed_small")


def split_model_output(model_out, x_t, learn_sigma: bool):
  """(mean_output [..., C], var_values [..., C] or None)."""
  channels = x_t.shape[-1]
  if learn_sigma:
    if model_out.shape != x_t.shape[:-1] + (2 * channels,):
      raise ValueError(f"learn_sigma needs a model output of shape "
                       f"{x_t.shape[:-1] + (2 * channels,)}, got {model_out.shape}.")
    return model_out[..., :channels], model_out[..., channels:]
  if model_out.shape != x_t.shape:
    raise ValueError(f"Expected a model output of shape {x_t.shape}, got "
                     f"{model_out.shape} (a 2C output needs learn_sigma=True).")
  return model_out, None


def learned_range_log_variance(schedule: DiffusionSchedule, var_values, x_t, t):
  """LEARNED_RANGE: values in [-1, 1] interpolate the log variance between the
  posterior's (beta tilde, the smallest sensible) and beta_t (the largest)."""
  min_log = extract(schedule.posterior_log_variance_clipped, t, x_t)
  max_log = extract(np.log(schedule.betas), t, x_t)
  frac = (var_values + 1) / 2
  return frac * max_log + (1 - frac) * min_log


def fixed_log_variance(schedule: DiffusionSchedule, x_t, t, variance: str):
  if variance == "fixed_large":
    # beta_t, except at t = 0 where the posterior variance of t = 1 gives a
    # better decoder log-likelihood (guided-diffusion's choice). A one-step
    # schedule has no t = 1: keep beta_0 (t = 0 adds no noise when sampling).
    table = schedule.betas
    if schedule.num_timesteps > 1:
      table = np.append(schedule.posterior_variance[1], schedule.betas[1:])
  elif variance == "fixed_small":
    return jnp.broadcast_to(
        extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape)
  else:
    raise ValueError(f"Unknown variance {variance!r}; valid: {VARIANCES}.")
  return jnp.broadcast_to(extract(np.log(table), t, x_t), x_t.shape)


def predict_x0(schedule: DiffusionSchedule, mean_out, x_t, t, prediction: str):
  if prediction == "epsilon":
    return schedules.predict_x0_from_eps(schedule, x_t, t, mean_out)
  if prediction == "v":
    return schedules.predict_x0_from_v(schedule, x_t, t, mean_out)
  if prediction == "x0":
    return mean_out
  raise ValueError(f"Unknown prediction {prediction!r}; valid: {PREDICTIONS}.")


def p_mean_variance(schedule: DiffusionSchedule, model_out, x_t, t, *,
                    prediction: str = "epsilon", learn_sigma: bool = False,
                    clip_denoised: bool = False, variance: str = "fixed_large"):
  """p(x_{t-1} | x_t) from the model's output at (x_t, t).

  t indexes ``schedule`` (a respaced index if the schedule is respaced; the
  model must already have been called with the original timestep).
  ``variance`` applies only when learn_sigma is False. clip_denoised clips the
  x0 prediction to [-1, 1] before it sets the mean.
  Returns a dict of x_t-shaped arrays: mean, variance, log_variance, pred_x0.
  """
  mean_out, var_values = split_model_output(model_out, x_t, learn_sigma)
  if learn_sigma:
    log_variance = learned_range_log_variance(schedule, var_values, x_t, t)
  else:
    log_variance = fixed_log_variance(schedule, x_t, t, variance)
  pred_x0 = predict_x0(schedule, mean_out, x_t, t, prediction)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1, 1)
  mean, _, _ = schedules.q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return dict(mean=mean, variance=jnp.exp(log_variance),
              log_variance=log_variance, pred_x0=pred_x0)
