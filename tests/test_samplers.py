"""DDPM / DDIM steps against a numpy transcription of guided-diffusion's
formulas, whole samplers (oracle recovery, one scan, sharding) and
classifier-free guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from multimodal.diffusion import samplers, schedules

pytestmark = pytest.mark.unit

T = 1000
SHAPE = (4, 3, 3, 2)  # B, H, W, C (channels last)


@pytest.fixture(scope="module")
def base():
  return schedules.named_schedule("linear", T)


@pytest.fixture(scope="module")
def spaced(base):
  return schedules.respace(base, schedules.space_timesteps(T, [10]))


def toy_model(xp, x, t, learn_sigma=False):
  """A smooth, t-dependent denoiser usable with numpy (xp=np) or jax (xp=jnp)."""
  tt = (t / 1000.0).reshape(-1, 1, 1, 1)
  eps = 0.5 * x * (1 - tt) + 0.1 * xp.sin(3 * x) + 0.2 * tt
  if learn_sigma:
    return xp.concatenate([eps, xp.tanh(x + tt)], axis=-1)
  return eps


def jax_model(learn_sigma=False):
  return lambda x, t: toy_model(jnp, x, t, learn_sigma)


# --- numpy reference, written from the guided-diffusion formulas -------------

def np_tables(betas):
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  return dict(
      betas=betas, abar=abar, abar_prev=abar_prev, post_var=post_var,
      post_logvar=np.log(np.append(post_var[1], post_var[1:])),
      coef1=betas * np.sqrt(abar_prev) / (1 - abar),
      coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))


def np_spaced_betas(base_betas, timestep_map):
  abar = np.cumprod(1 - base_betas)[timestep_map]
  return 1 - abar / np.append(1.0, abar[:-1])


def np_p_mean_variance(tb, out, x, t, prediction, learn_sigma, variance, clip):
  e = lambda a: a[t].reshape(-1, 1, 1, 1)
  c = x.shape[-1]
  if learn_sigma:
    out, var_values = out[..., :c], out[..., c:]
    frac = (var_values + 1) / 2
    logvar = frac * e(np.log(tb["betas"])) + (1 - frac) * e(tb["post_logvar"])
  elif variance == "fixed_large":
    logvar = e(np.log(np.append(tb["post_var"][1], tb["betas"][1:]))) + 0 * x
  else:
    logvar = e(tb["post_logvar"]) + 0 * x
  if prediction == "epsilon":
    x0 = np.sqrt(1 / e(tb["abar"])) * x - np.sqrt(1 / e(tb["abar"]) - 1) * out
  else:  # v
    x0 = np.sqrt(e(tb["abar"])) * x - np.sqrt(1 - e(tb["abar"])) * out
  if clip:
    x0 = np.clip(x0, -1, 1)
  return e(tb["coef1"]) * x0 + e(tb["coef2"]) * x, logvar, x0


def np_ddpm_step(tb, timestep_map, x, t, noise, prediction="epsilon",
                 learn_sigma=False, variance="fixed_large", clip=False):
  out = toy_model(np, x, timestep_map[t], learn_sigma)
  mean, logvar, _ = np_p_mean_variance(tb, out, x, t, prediction, learn_sigma,
                                       variance, clip)
  nonzero = (t != 0).reshape(-1, 1, 1, 1)
  return mean + nonzero * np.exp(0.5 * logvar) * noise


def np_ddim_step(tb, timestep_map, x, t, noise, eta, prediction="epsilon",
                 learn_sigma=False, clip=False):
  out = toy_model(np, x, timestep_map[t], learn_sigma)
  _, _, x0 = np_p_mean_variance(tb, out, x, t, prediction, learn_sigma, None, clip)
  e = lambda a: a[t].reshape(-1, 1, 1, 1)
  abar, abar_prev = e(tb["abar"]), e(tb["abar_prev"])
  eps = (np.sqrt(1 / abar) * x - x0) / np.sqrt(1 / abar - 1)
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
  nonzero = (t != 0).reshape(-1, 1, 1, 1)
  return (x0 * np.sqrt(abar_prev) + np.sqrt(1 - abar_prev - sigma ** 2) * eps
          + nonzero * sigma * noise)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=SHAPE).astype(np.float32),
          rng.normal(size=SHAPE).astype(np.float32))


# --- single steps -------------------------------------------------------------

@pytest.mark.parametrize("prediction,learn_sigma,variance,clip", [
    ("epsilon", False, "fixed_large", False),
    ("epsilon", False, "fixed_small", True),
    ("epsilon", True, "fixed_large", False),
    ("v", True, "fixed_large", True),
])
def test_one_ddpm_step_matches_numpy(base, spaced, prediction, learn_sigma, variance, clip):
  sched, timestep_map = spaced
  tb = np_tables(np_spaced_betas(base.betas, timestep_map))
  x, noise = _inputs()
  t = np.array([9, 4, 1, 0])  # respaced indices; t == 0 adds no noise
  got, _ = samplers.ddpm_step(jax_model(learn_sigma), sched, x, t, noise,
                              timestep_map=timestep_map, prediction=prediction,
                              learn_sigma=learn_sigma, variance=variance,
                              clip_denoised=clip)
  want = np_ddpm_step(tb, timestep_map, x.astype(np.float64), t, noise, prediction,
                      learn_sigma, variance, clip)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("learn_sigma,clip", [(False, False), (True, True)])
def test_one_ddim_step_matches_numpy(base, spaced, eta, learn_sigma, clip):
  sched, timestep_map = spaced
  tb = np_tables(np_spaced_betas(base.betas, timestep_map))
  x, noise = _inputs(1)
  t = np.array([9, 5, 2, 0])
  got, _ = samplers.ddim_step(jax_model(learn_sigma), sched, x, t, noise, eta=eta,
                              timestep_map=timestep_map, learn_sigma=learn_sigma,
                              clip_denoised=clip)
  want = np_ddim_step(tb, timestep_map, x.astype(np.float64), t, noise, eta,
                      learn_sigma=learn_sigma, clip=clip)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if eta == 0.0:  # deterministic: the noise is not needed at all
    no_noise, _ = samplers.ddim_step(jax_model(learn_sigma), sched, x, t, eta=0.0,
                                     timestep_map=timestep_map,
                                     learn_sigma=learn_sigma, clip_denoised=clip)
    np.testing.assert_allclose(no_noise, got, rtol=1e-6, atol=1e-6)


# --- whole samplers -------------------------------------------------------------

def test_ddpm_sample_matches_numpy_loop(base):
  """The whole scan, with the documented key schedule replayed in numpy."""
  sched, timestep_map = schedules.respace(base, schedules.space_timesteps(T, [5]))
  tb = np_tables(np_spaced_betas(base.betas, timestep_map))
  key = jax.random.key(3)
  fn = jax.jit(lambda k: samplers.ddpm_sample(
      jax_model(True), sched, SHAPE, k, timestep_map=timestep_map, learn_sigma=True,
      return_trajectory=True))
  got, trajectory = fn(key)
  assert trajectory.shape == (5,) + SHAPE

  key_init, key_steps = jax.random.split(key)
  x = np.asarray(jax.random.normal(key_init, SHAPE), np.float64)
  for j, (i, k) in enumerate(zip(range(4, -1, -1), jax.random.split(key_steps, 5))):
    z = np.asarray(jax.random.normal(k, SHAPE))
    x = np_ddpm_step(tb, timestep_map, x, np.full(SHAPE[0], i), z, learn_sigma=True)
    np.testing.assert_allclose(trajectory[j], x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_ddim_with_an_oracle_recovers_x0(base):
  """A model that knows x0 returns the eps implied by it at the ORIGINAL
  timestep; DDIM (eta 0) then lands on x0 exactly, but only if the sampler
  maps respaced indices back through timestep_map."""
  sched, timestep_map = schedules.respace(base, schedules.space_timesteps(T, "ddim20"))
  x0 = np.random.default_rng(5).uniform(-1, 1, size=(4, 8, 8, 3)).astype(np.float32)
  abar = jnp.asarray(base.alphas_cumprod, jnp.float32)

  def oracle(x_t, t):
    a = abar[t].reshape(-1, 1, 1, 1)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  def sample(tm):
    return jax.jit(lambda k: samplers.ddim_sample(
        oracle, sched, x0.shape, k, timestep_map=tm))(jax.random.key(0))
  np.testing.assert_allclose(sample(timestep_map), x0, atol=1e-3)
  # Without the map the oracle is asked about the wrong (respaced) timesteps.
  assert np.abs(sample(None) - x0).max() > 0.1
  # A single step (t = 0 only) is x0 from one model call, for both samplers.
  one, one_map = schedules.respace(base, schedules.space_timesteps(T, [1]))
  for sampler in (samplers.ddim_sample, samplers.ddpm_sample):
    np.testing.assert_allclose(
        sampler(oracle, one, x0.shape, jax.random.key(1), timestep_map=one_map), x0,
        atol=1e-3)


def test_sampler_is_one_scan_whatever_the_step_count(base):
  key = jax.random.key(0)

  def jaxpr(num_steps, sampler):
    sched, tm = schedules.respace(base, schedules.space_timesteps(T, num_steps))
    return jax.make_jaxpr(lambda k: sampler(jax_model(True), sched, SHAPE, k,
                                            timestep_map=tm, learn_sigma=True))(key)

  for sampler in (samplers.ddpm_sample, samplers.ddim_sample):
    short, long = jaxpr(5, sampler), jaxpr(50, sampler)
    assert [e.primitive.name for e in short.jaxpr.eqns].count("scan") == 1
    # No Python loop over steps: the program does not grow with K.
    assert len(short.jaxpr.eqns) == len(long.jaxpr.eqns)
    scan = next(e for e in long.jaxpr.eqns if e.primitive.name == "scan")
    assert scan.params["length"] == 50
  # And it runs batched, with a traced eta, under one jit.
  sched, tm = schedules.respace(base, schedules.space_timesteps(T, 5))
  out = jax.jit(lambda k, eta: samplers.ddim_sample(
      jax_model(), sched, (6, 4, 4, 3), k, eta=eta, timestep_map=tm))(key, 0.5)
  assert out.shape == (6, 4, 4, 3) and np.isfinite(out).all()


# --- classifier-free guidance ------------------------------------------------

C = 4  # latent channels, as DiT's VAE latents


def _cond_uncond():
  """Conditional / unconditional toy models with a learnt variance (2C out)."""
  def cond(x, t):
    return jnp.concatenate([jnp.sin(x) + 1.0, jnp.tanh(x) * 0.5], axis=-1)

  def uncond(x, t):
    return jnp.concatenate([jnp.cos(x), -jnp.tanh(x) * 0.3], axis=-1)

  def doubled(x2, t2):  # first half conditional, second unconditional
    half = x2.shape[0] // 2
    return jnp.concatenate([cond(x2[:half], t2[:half]), uncond(x2[half:], t2[half:])])
  return cond, uncond, doubled


def test_cfg_scale_one_is_conditional_zero_is_unconditional():
  cond, uncond, doubled = _cond_uncond()
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, C)), jnp.float32)
  t = jnp.array([10, 500])
  c, u = cond(x, t), uncond(x, t)
  for model in (doubled, (cond, uncond)):
    np.testing.assert_allclose(samplers.cfg_model_fn(model, 1.0)(x, t), c, rtol=1e-6)
    zero = samplers.cfg_model_fn(model, 0.0)(x, t)
    np.testing.assert_allclose(zero[..., :C], u[..., :C], rtol=1e-6)
    np.testing.assert_allclose(zero[..., C:], c[..., C:], rtol=1e-6)  # variance: cond
    g = jax.jit(lambda x, t, s: samplers.cfg_model_fn(model, s)(x, t))(x, t, 4.0)
    np.testing.assert_allclose(g[..., :C], u[..., :C] + 4.0 * (c[..., :C] - u[..., :C]),
                               rtol=1e-5)
    np.testing.assert_allclose(g[..., C:], c[..., C:], rtol=1e-6)


def test_cfg_dit_quirk_guides_only_three_channels():
  cond, uncond, doubled = _cond_uncond()
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, 3, C)), jnp.float32)
  t = jnp.array([3, 999])
  c, u = cond(x, t), uncond(x, t)
  full = samplers.cfg_model_fn(doubled, 4.0)(x, t)
  quirk = samplers.cfg_model_fn(doubled, 4.0, dit_three_channel_quirk=True)(x, t)
  np.testing.assert_allclose(quirk[..., :3], full[..., :3], rtol=1e-6)
  np.testing.assert_allclose(quirk[..., 3:], c[..., 3:], rtol=1e-6)
  assert np.abs(full[..., 3] - c[..., 3]).max() > 0.1  # channel 3 differs


# --- sharding -----------------------------------------------------------------

def test_samplers_keep_the_batch_sharded(base):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = NamedSharding(mesh, P("data"))
  sched, tm = schedules.respace(base, schedules.space_timesteps(T, 4))
  shape = (8, 4, 4, C)
  cond, uncond, doubled = _cond_uncond()
  guided = samplers.cfg_model_fn(doubled, 1.5)
  key = jax.random.key(1)
  x_T = jax.random.normal(jax.random.key(2), shape)

  runs = {
      "ddpm": lambda k, x, s: samplers.ddpm_sample(
          guided, sched, shape, k, timestep_map=tm, learn_sigma=True, noise=x, sharding=s),
      "ddim": lambda k, x, s: samplers.ddim_sample(
          guided, sched, shape, k, eta=0.5, timestep_map=tm, learn_sigma=True,
          noise=x, sharding=s),
      # x_T drawn inside the sampler: the partitionable RNG gives the same draws.
      "ddpm_own_noise": lambda k, x, s: samplers.ddpm_sample(
          guided, sched, shape, k, timestep_map=tm, learn_sigma=True, sharding=s),
  }
  for name, run in runs.items():
    sharded = jax.jit(lambda k, x: run(k, x, shard))(key, jax.device_put(x_T, shard))
    unsharded = jax.jit(lambda k, x: run(k, x, None))(key, x_T)
    assert sharded.sharding.is_equivalent_to(shard, sharded.ndim), name
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5, atol=1e-5, err_msg=name)
