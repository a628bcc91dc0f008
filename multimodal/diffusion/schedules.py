"""Noise schedules and the forward process q (after guided-diffusion's
gaussian_diffusion.py and respace.py, as used by DiT).

Tables are float64 numpy, computed on the host once, exactly as
guided-diffusion computes them; the functions below gather them at integer
timesteps inside jit, where they become float32 constants (float64 only if x64
is on and x is float64). guided-diffusion does the same: float64 tables, cast to
float32 after the gather.

Timesteps are 0-based: t = 0 is the first noising step, t = T - 1 the last.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence

import jax.numpy as jnp
import numpy as np

# Nichol & Dhariwal's cosine schedule: the offset keeps beta_0 from being tiny,
# and betas are capped below 1 so the last step is not a singularity.
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Betas [T] as float64 numpy.

  "linear": Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled by 1000 / T so the
  schedule keeps its shape for any T (DiT's default).
  "cosine" (alias "squaredcos_cap_v2", DiT's name): alpha_bar(t) =
  cos^2((t / T + s) / (1 + s) * pi / 2), betas capped at 0.999.
  """
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name in ("cosine", "squaredcos_cap_v2"):
    return betas_for_alpha_bar(
        num_timesteps,
        lambda t: math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2)
  raise ValueError(f"Unknown beta schedule {name!r}; valid names are "
                   "'linear' and 'cosine' (alias 'squaredcos_cap_v2').")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = COSINE_MAX_BETA
                        ) -> np.ndarray:
  """Discretises a continuous alpha_bar(t), t in [0, 1], into T betas."""
  betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
               max_beta) for i in range(num_timesteps)]
  return np.array(betas, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSchedule:
  """Every table guided-diffusion derives from betas, float64, read-only.

  eq=False keeps identity hashing: a schedule can be a static argument or a
  closure constant of a jitted function (its arrays are not hashable).
  Build with ``DiffusionSchedule.from_betas(betas)``.
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  alphas_cumprod_next: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @classmethod
  def from_betas(cls, betas) -> DiffusionSchedule:
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be 1-D with every value in (0, 1].")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t = 0, so its log is clipped by reusing
    # t = 1's value there (guided-diffusion). With a single step there is no
    # t = 1; guided-diffusion leaves the table empty, which would break every
    # gather, so use log(beta_0): it only matters if noise is added at t = 0,
    # which no sampler does.
    if len(betas) > 1:
      posterior_log_variance_clipped = np.log(
          np.append(posterior_variance[1], posterior_variance[1:]))
    else:
      posterior_log_variance_clipped = np.log(betas)
    tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=((1.0 - alphas_cumprod_prev) * np.sqrt(alphas)
                              / (1.0 - alphas_cumprod)),
    )
    for table in tables.values():
      table.setflags(write=False)  # frozen means frozen, arrays included.
    return cls(**tables)


def named_schedule(name: str, num_timesteps: int) -> DiffusionSchedule:
  return DiffusionSchedule.from_betas(get_beta_schedule(name, num_timesteps))


def extract(table: np.ndarray, t, x) -> jnp.ndarray:
  """table[t] shaped [B, 1, ..., 1] to broadcast against x ([B, ...]).

  t is int [B] (a scalar is broadcast to the batch).
  """
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
  values = jnp.asarray(table, dtype=dtype)[t]
  return values.reshape(x.shape[:1] + (1,) * (x.ndim - 1))


def q_sample(schedule: DiffusionSchedule, x0, t, noise):
  """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I), with given noise."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0, x_t, t):
  """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), x's shape."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, x_t), x_t.shape)
  log_variance = jnp.broadcast_to(
      extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape)
  return mean, variance, log_variance


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t, t, eps):
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t, t, x0):
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


# v-prediction (Salimans & Ho): with a = sqrt(abar_t), s = sqrt(1 - abar_t),
# x_t = a x0 + s eps and v = a eps - s x0; the pair is a rotation, so
# x0 = a x_t - s v and eps = s x_t + a v.
def v_from_x0_eps(schedule: DiffusionSchedule, x0, t, eps):
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * eps
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def predict_x0_from_v(schedule: DiffusionSchedule, x_t, t, v):
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(schedule: DiffusionSchedule, x_t, t, v):
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
          + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]
                    ) -> set[int]:
  """The original timesteps to keep, as respace.py chooses them.

  section_counts: an int K (K evenly strided steps), a list of per-section
  counts or their comma-separated string (the T steps are cut into equal
  sections, each strided to its count), or "ddimK" (DDIM's fixed integer
  stride giving exactly K steps, starting at 0).
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired_count} steps out of "
                       f"{num_timesteps} with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"cannot divide section of {size} steps into {section_count}")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      # Python's round (half to even), as respace.py: other roundings pick
      # different steps for some counts.
      all_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    start_idx += size
  return set(all_steps)


def respace(schedule: DiffusionSchedule, use_timesteps: Collection[int]
            ) -> tuple[DiffusionSchedule, np.ndarray]:
  """A schedule over only the kept steps, and the map back to original steps.

  Betas are recomputed from alphas_cumprod so the respaced process has exactly
  the original abar at every kept step (respace.py's SpacedDiffusion). The
  returned timestep_map (int32 [K], increasing) turns a respaced index into the
  original timestep that the model was trained on.
  """
  keep = set(int(i) for i in use_timesteps)
  if not keep or min(keep) < 0 or max(keep) >= schedule.num_timesteps:
    raise ValueError(f"use_timesteps must be a non-empty subset of "
                     f"[0, {schedule.num_timesteps}).")
  timestep_map = np.array(sorted(keep), dtype=np.int32)
  kept_abar = schedule.alphas_cumprod[timestep_map]
  new_betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
  timestep_map.setflags(write=False)
  return DiffusionSchedule.from_betas(new_betas), timestep_map
