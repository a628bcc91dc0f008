"""DDPM and DDIM sampling, and classifier-free guidance (after guided-diffusion's
p_sample / ddim_sample and DiT's sample.py).

Each sampler is one function of arrays: a jax.lax.scan over the respaced steps
in reverse, with no host callbacks and no Python loop over steps, so it jits
into one program, and a batch sharded over a mesh stays sharded (every op is
per-example; random draws use the partitionable threefry).

Respacing as respace.py's _WrappedModel: the schedule is the respaced one and
its indices drive the maths, but the model is called with timestep_map[i], the
original timestep it was trained on.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from multimodal.diffusion import schedules
from multimodal.diffusion.model_output import p_mean_variance  # noqa: F401 (API)
from multimodal.diffusion.schedules import DiffusionSchedule, extract

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _model_timesteps(t, timestep_map):
  return t if timestep_map is None else jnp.asarray(timestep_map, jnp.int32)[t]


def _nonzero_mask(t, x):
  """1 where t != 0: the last step (t == 0) returns the mean, no noise."""
  return (t != 0).astype(x.dtype).reshape(x.shape[:1] + (1,) * (x.ndim - 1))


def ddpm_step(model_fn: ModelFn, schedule: DiffusionSchedule, x_t, t, noise, *,
              timestep_map=None, prediction: str = "epsilon",
              learn_sigma: bool = False, variance: str = "fixed_large",
              clip_denoised: bool = False):
  """x_{t-1} ~ p(x_{t-1} | x_t) (guided-diffusion's p_sample), given the noise.

  t: int [B] indexing ``schedule``. Returns (x_{t-1}, pred_x0).
  """
  out = p_mean_variance(schedule, model_fn(x_t, _model_timesteps(t, timestep_map)),
                        x_t, t, prediction=prediction, learn_sigma=learn_sigma,
                        clip_denoised=clip_denoised, variance=variance)
  sample = (out["mean"]
            + _nonzero_mask(t, x_t) * jnp.exp(0.5 * out["log_variance"]) * noise)
  return sample, out["pred_x0"]


def ddim_step(model_fn: ModelFn, schedule: DiffusionSchedule, x_t, t, noise=None, *,
              eta=0.0, timestep_map=None, prediction: str = "epsilon",
              learn_sigma: bool = False, clip_denoised: bool = False):
  """One DDIM step (Song et al. eq. 12, guided-diffusion's ddim_sample).

  eta = 0 is deterministic (noise may be None); eta = 1 matches DDPM's
  posterior-variance (fixed_small) step. A learnt variance is ignored.
  Returns (x_{t-1}, pred_x0).
  """
  out = p_mean_variance(schedule, model_fn(x_t, _model_timesteps(t, timestep_map)),
                        x_t, t, prediction=prediction, learn_sigma=learn_sigma,
                        clip_denoised=clip_denoised)
  # eps is re-derived from the (possibly clipped) x0, whatever the model predicts.
  eps = schedules.predict_eps_from_x0(schedule, x_t, t, out["pred_x0"])
  alpha_bar = extract(schedule.alphas_cumprod, t, x_t)
  alpha_bar_prev = extract(schedule.alphas_cumprod_prev, t, x_t)
  sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
           * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
  sample = (out["pred_x0"] * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
  if noise is not None:
    sample = sample + _nonzero_mask(t, x_t) * sigma * noise
  return sample, out["pred_x0"]


def _reverse_scan(step, schedule, shape, key, *, noise, sharding, draws_noise,
                  return_trajectory, dtype):
  """Runs step(x, t, z) -> x for t = K-1 .. 0 as one scan.

  Keys: split(key) -> (init, steps); x_T ~ N(0, I) from init unless ``noise``
  is given; the j-th step (j = 0 is t = K-1) draws from split(steps, K)[j].
  """
  num_steps = schedule.num_timesteps
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, shape, dtype) if noise is None else noise
  constrain = ((lambda a: jax.lax.with_sharding_constraint(a, sharding))
               if sharding is not None else (lambda a: a))
  x = constrain(x)

  def body(x, inputs):
    i, step_key = inputs
    t = jnp.full(x.shape[:1], i, jnp.int32)
    z = constrain(jax.random.normal(step_key, x.shape, x.dtype)) if draws_noise else None
    x = constrain(step(x, t, z).astype(x.dtype))
    return x, (x if return_trajectory else None)

  steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  x, trajectory = jax.lax.scan(body, x, (steps, jax.random.split(key_steps, num_steps)))
  return (x, trajectory) if return_trajectory else x


def ddpm_sample(model_fn: ModelFn, schedule: DiffusionSchedule, shape, key, *,
                timestep_map=None, prediction: str = "epsilon",
                learn_sigma: bool = False, variance: str = "fixed_large",
                clip_denoised: bool = False, noise=None, sharding=None,
                return_trajectory: bool = False, dtype=jnp.float32):
  """Ancestral sampling over every step of ``schedule`` (respaced or not).

  Args:
    model_fn: (x_t, t_original) -> output (2C channels if learn_sigma).
    schedule: the (respaced) schedule; timestep_map from schedules.respace, or
      None when the schedule is the one the model was trained on.
    shape: [B, ..., C]; key: PRNG key.
    noise: optional x_T (else drawn from key), e.g. already sharded.
    sharding: optional sharding to pin x to at every step (e.g. batch over
      "data"); without it XLA propagates whatever ``noise`` carries.
    return_trajectory: also return x after every step, [K, *shape].
  Returns x_0 [*shape] (or (x_0, trajectory)).
  """
  def step(x, t, z):
    return ddpm_step(model_fn, schedule, x, t, z, timestep_map=timestep_map,
                     prediction=prediction, learn_sigma=learn_sigma,
                     variance=variance, clip_denoised=clip_denoised)[0]
  return _reverse_scan(step, schedule, shape, key, noise=noise, sharding=sharding,
                       draws_noise=True, return_trajectory=return_trajectory,
                       dtype=dtype)


def ddim_sample(model_fn: ModelFn, schedule: DiffusionSchedule, shape, key, *,
                eta=0.0, timestep_map=None, prediction: str = "epsilon",
                learn_sigma: bool = False, clip_denoised: bool = False,
                noise=None, sharding=None, return_trajectory: bool = False,
                dtype=jnp.float32):
  """DDIM over every step of ``schedule``; arguments as ddpm_sample.

  With a Python eta == 0 no per-step noise is drawn at all (the key then only
  sets x_T); eta may also be a traced scalar.
  """
  deterministic = isinstance(eta, (int, float)) and eta == 0

  def step(x, t, z):
    return ddim_step(model_fn, schedule, x, t, z, eta=eta, timestep_map=timestep_map,
                     prediction=prediction, learn_sigma=learn_sigma,
                     clip_denoised=clip_denoised)[0]
  return _reverse_scan(step, schedule, shape, key, noise=noise, sharding=sharding,
                       draws_noise=not deterministic,
                       return_trajectory=return_trajectory, dtype=dtype)


def cfg_model_fn(model_fn, scale, *, dit_three_channel_quirk: bool = False) -> ModelFn:
  """Classifier-free guidance as a model: (x, t) -> guided output, batch B.

  ``model_fn`` is either
    * one function on a doubled batch: f(concat([x, x]), concat([t, t])) whose
      first half is conditional and second half unconditional (the caller's
      closure supplies [labels, null_labels]); one model call per step, as DiT;
    * or a pair (cond_fn, uncond_fn) of (x, t) -> output; two calls.
  Guided = uncond + scale * (cond - uncond) on every data channel (the first C
  = x.shape[-1] output channels); any further channels (the learnt variance)
  are the conditional half's. scale = 1 is the conditional model, 0 the
  unconditional one. ``scale`` may be traced.

  dit_three_channel_quirk: guide only output channels [:3] and take the rest
  (incl. the 4th latent channel) from the conditional half, as DiT's
  forward_with_cfg does "for exact reproducibility"; use it only to reproduce
  DiT's published samples.
  """
  def guided(x, t):
    if isinstance(model_fn, (tuple, list)):
      cond_fn, uncond_fn = model_fn
      cond, uncond = cond_fn(x, t), uncond_fn(x, t)
    else:
      out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
      cond, uncond = jnp.split(out, 2)
    num_guided = 3 if dit_three_channel_quirk else x.shape[-1]
    mixed = uncond[..., :num_guided] + scale * (cond[..., :num_guided]
                                                - uncond[..., :num_guided])
    return jnp.concatenate([mixed.astype(cond.dtype), cond[..., num_guided:]], axis=-1)
  return guided
