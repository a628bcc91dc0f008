"""Schedules, the forward process, respacing and the training loss against
closed forms written here in numpy / scipy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from multimodal.diffusion import losses, schedules
from multimodal.diffusion.schedules import DiffusionSchedule

pytestmark = pytest.mark.unit

T = 1000


@pytest.fixture(scope="module")
def linear():
  return schedules.named_schedule("linear", T)


def _data(shape=(4, 3, 3, 2), seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, size=shape).astype(np.float32)
  noise = rng.normal(size=shape).astype(np.float32)
  return x0, noise


def test_linear_schedule_closed_form(linear):
  np.testing.assert_allclose(linear.betas, np.linspace(1e-4, 0.02, T), rtol=1e-12)
  assert linear.betas.dtype == np.float64
  # The scale 1000 / T keeps the schedule's shape for other T.
  np.testing.assert_allclose(schedules.get_beta_schedule("linear", 250),
                             np.linspace(4e-4, 0.08, 250), rtol=1e-12)
  np.testing.assert_allclose(linear.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, T)),
                             rtol=1e-12)


@pytest.mark.parametrize("name", ["cosine", "squaredcos_cap_v2"])
def test_cosine_schedule_closed_form(name):
  sched = schedules.named_schedule(name, T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  # alpha_bar(t) = f(t) / f(0) at the end of every step; only the last beta
  # (alpha_bar -> 0) is capped at 0.999, so compare the rest exactly.
  steps = np.arange(1, T + 1)
  np.testing.assert_allclose(sched.alphas_cumprod[:-1], (f(steps) / f(0))[:-1],
                             rtol=1e-9, atol=1e-15)
  assert sched.betas.max() == pytest.approx(0.999)
  assert sched.betas[-1] == pytest.approx(0.999)
  assert (sched.betas[:-1] < 0.999).all()


def test_schedule_tables_are_guided_diffusions(linear):
  b = linear.betas
  abar = np.cumprod(1 - b)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = b * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(linear.posterior_variance, post_var, rtol=1e-12)
  assert linear.posterior_variance[0] == 0
  np.testing.assert_allclose(linear.posterior_log_variance_clipped[0], np.log(post_var[1]))
  np.testing.assert_allclose(linear.posterior_log_variance_clipped[1:], np.log(post_var[1:]))
  np.testing.assert_allclose(linear.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1))
  np.testing.assert_allclose(linear.alphas_cumprod_next[-1], 0.0)
  with pytest.raises(ValueError):  # frozen, arrays included
    linear.betas[0] = 1.0


def test_q_sample_closed_form(linear):
  x0, noise = _data()
  t = np.array([0, 10, 500, 999])
  got = schedules.q_sample(linear, x0, t, noise)
  abar = np.cumprod(1 - linear.betas)[t][:, None, None, None]
  want = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_posterior_is_the_gaussian_posterior(linear):
  """q(x_{t-1} | x_t, x0) from Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
  times likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
  x0, noise = _data()
  t = np.array([1, 5, 300, 999])
  x_t = np.asarray(schedules.q_sample(linear, x0, t, noise), np.float64)
  b = linear.betas[t][:, None, None, None]
  abar = np.cumprod(1 - linear.betas)
  abar_prev = abar[t - 1][:, None, None, None]
  prior_mean, prior_var = np.sqrt(abar_prev) * x0, 1 - abar_prev
  # Likelihood of x_{t-1} given x_t: mean x_t / sqrt(alpha), variance beta / alpha.
  lik_mean, lik_var = x_t / np.sqrt(1 - b), b / (1 - b)
  want_var = 1 / (1 / prior_var + 1 / lik_var)
  want_mean = want_var * (prior_mean / prior_var + lik_mean / lik_var)
  mean, var, log_var = schedules.q_posterior_mean_variance(
      linear, x0, x_t.astype(np.float32), t)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(var, np.broadcast_to(want_var, x0.shape), rtol=1e-4)
  np.testing.assert_allclose(log_var, np.log(np.broadcast_to(want_var, x0.shape)), rtol=1e-4)


def test_eps_x0_v_round_trips(linear):
  x0, eps = _data()
  t = np.array([0, 17, 400, 999])
  x_t = schedules.q_sample(linear, x0, t, eps)
  np.testing.assert_allclose(schedules.predict_x0_from_eps(linear, x_t, t, eps), x0, atol=2e-4)
  np.testing.assert_allclose(schedules.predict_eps_from_x0(linear, x_t, t, x0), eps, atol=2e-3)
  v = schedules.v_from_x0_eps(linear, x0, t, eps)
  abar = np.cumprod(1 - linear.betas)[t][:, None, None, None]
  np.testing.assert_allclose(v, np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(schedules.predict_x0_from_v(linear, x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(schedules.predict_eps_from_v(linear, x_t, t, v), eps, atol=1e-5)


def test_space_timesteps_matches_respace_py():
  assert schedules.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
  assert schedules.space_timesteps(1000, [10]) == {0, 111, 222, 333, 444, 555, 666, 777,
                                                   888, 999}
  assert schedules.space_timesteps(1000, 10) == schedules.space_timesteps(1000, "10")
  # DiT's sample.py default, "250": stride 999/249, Python's half-to-even round.
  steps = sorted(schedules.space_timesteps(1000, "250"))
  assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999
  # respace.py's docstring example: three sections of 100 steps.
  steps = sorted(schedules.space_timesteps(300, [10, 15, 20]))
  assert len(steps) == 45
  assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
  assert steps[10:12] == [100, 107] and steps[24] == 199
  assert steps[25] == 200 and steps[-1] == 299
  with pytest.raises(ValueError):
    schedules.space_timesteps(1000, "ddim3000")


def test_respace_keeps_alphas_cumprod(linear):
  use = schedules.space_timesteps(T, "ddim50")
  spaced, timestep_map = schedules.respace(linear, use)
  np.testing.assert_array_equal(timestep_map, np.arange(0, 1000, 20))
  assert spaced.num_timesteps == 50
  np.testing.assert_allclose(spaced.alphas_cumprod, linear.alphas_cumprod[timestep_map],
                             rtol=1e-12)
  # Respacing to every step is the identity.
  same, ident = schedules.respace(linear, range(T))
  np.testing.assert_allclose(same.betas, linear.betas, rtol=1e-9)
  np.testing.assert_array_equal(ident, np.arange(T))
  # One step still gives gatherable tables.
  one, _ = schedules.respace(linear, [0])
  assert one.posterior_log_variance_clipped.shape == (1,)


def test_normal_kl_matches_scipy():
  rng = np.random.default_rng(1)
  m1, m2 = rng.normal(size=20), rng.normal(size=20)
  lv1, lv2 = rng.normal(size=20), rng.normal(size=20)
  got = losses.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  # KL(p || q) = E_p[log p - log q], by quadrature over p's support.
  want = []
  for a, la, b, lb in zip(m1, lv1, m2, lv2):
    p, q = stats.norm(a, np.exp(la / 2)), stats.norm(b, np.exp(lb / 2))
    xs = np.linspace(a - 12 * p.std(), a + 12 * p.std(), 20001)
    want.append(np.trapezoid(p.pdf(xs) * (p.logpdf(xs) - q.logpdf(xs)), xs))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_discretized_log_likelihood_matches_exact_cdf():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, size=200) / 127.5 - 1.0  # uint8 rescaled to [-1, 1]
  x[:3] = [-1.0, 1.0, 0.0]
  means = np.clip(x + rng.normal(scale=0.05, size=x.shape), -1, 1)
  log_scales = rng.uniform(np.log(0.01), np.log(0.5), size=x.shape)
  got = losses.discretized_gaussian_log_likelihood(
      jnp.asarray(x, jnp.float32), means=jnp.asarray(means, jnp.float32),
      log_scales=jnp.asarray(log_scales, jnp.float32))
  dist = stats.norm(means, np.exp(log_scales))
  hi, lo = dist.cdf(x + 1 / 255), dist.cdf(x - 1 / 255)
  log = lambda p: np.log(np.maximum(p, 1e-12))  # every branch is evaluated
  want = np.where(x < -0.999, log(hi), np.where(x > 0.999, log(1 - lo), log(hi - lo)))
  # The tanh approximation of Phi is good to ~1e-4 absolute, so compare
  # probabilities loosely, not log-probabilities of tiny bins.
  np.testing.assert_allclose(np.exp(got), np.exp(want), atol=2e-3)
  np.testing.assert_allclose(got[:3], want[:3], rtol=2e-2)
  xs = np.linspace(-5, 5, 101)
  np.testing.assert_allclose(losses.approx_standard_normal_cdf(xs), stats.norm.cdf(xs),
                             atol=5e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_training_loss_is_zero_for_the_true_target(linear, prediction):
  x0, noise = _data()
  t = np.array([0, 3, 500, 999])

  def oracle(x_t, t_model):
    np.testing.assert_array_equal(t_model, t)
    return {"epsilon": noise, "x0": x0,
            "v": schedules.v_from_x0_eps(linear, x0, t, noise)}[prediction]

  out = losses.training_losses(linear, oracle, x0, t, noise, prediction=prediction)
  assert set(out) == {"loss", "mse", "vb"} and out["loss"].shape == (4,)
  np.testing.assert_allclose(out["mse"], 0, atol=1e-10)
  np.testing.assert_allclose(out["vb"], 0)
  np.testing.assert_allclose(out["loss"], out["mse"])


def _numpy_vb_bits(sched, x0, x_t, t, eps_pred, var_values):
  """The hybrid loss's vb term, written out from guided-diffusion in numpy."""
  x0, x_t, eps_pred, var_values = (np.asarray(a, np.float64)
                                   for a in (x0, x_t, eps_pred, var_values))
  e = lambda a: a[t][:, None, None, None]
  pred_x0 = (e(sched.sqrt_recip_alphas_cumprod) * x_t
             - e(sched.sqrt_recipm1_alphas_cumprod) * eps_pred)
  mean = e(sched.posterior_mean_coef1) * pred_x0 + e(sched.posterior_mean_coef2) * x_t
  true_mean = e(sched.posterior_mean_coef1) * x0 + e(sched.posterior_mean_coef2) * x_t
  true_lv = e(sched.posterior_log_variance_clipped)
  frac = (var_values + 1) / 2
  lv = frac * e(np.log(sched.betas)) + (1 - frac) * true_lv
  kl = 0.5 * (-1 + lv - true_lv + np.exp(true_lv - lv) + (true_mean - mean) ** 2 * np.exp(-lv))
  sd = np.exp(0.5 * lv)
  hi = stats.norm.cdf((x0 - mean + 1 / 255) / sd)
  lo = stats.norm.cdf((x0 - mean - 1 / 255) / sd)
  log = lambda p: np.log(np.maximum(p, 1e-12))  # every branch is evaluated
  ll = np.where(x0 < -0.999, log(hi), np.where(x0 > 0.999, log(1 - lo), log(hi - lo)))
  axes = (1, 2, 3)
  return np.where(t == 0, -ll.mean(axes), kl.mean(axes)) / np.log(2)


def test_learned_sigma_loss_matches_numpy_and_freezes_the_mean(linear):
  # uint8-like data so the decoder NLL at t == 0 has its bins.
  x0 = np.random.default_rng(3).integers(0, 256, size=(4, 3, 3, 2)) / 127.5 - 1
  x0 = x0.astype(np.float32)
  _, noise = _data()
  t = np.array([0, 1, 250, 999])
  rng = np.random.default_rng(4)
  eps_err = rng.normal(scale=0.1, size=x0.shape).astype(np.float32)
  var_values = rng.uniform(-1, 1, size=x0.shape).astype(np.float32)

  def model(params, x_t, t_model):
    return jnp.concatenate([noise + params["mean"] * eps_err,
                            params["var"] * var_values], axis=-1)

  params = {"mean": jnp.float32(1.0), "var": jnp.float32(1.0)}
  out = losses.training_losses(linear, lambda x, s: model(params, x, s), x0, t, noise,
                               learn_sigma=True)
  np.testing.assert_allclose(out["mse"], (eps_err ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  x_t = schedules.q_sample(linear, x0, t, noise)
  want_vb = _numpy_vb_bits(linear, x0, x_t, t, noise + eps_err, var_values)
  # float32 maths and the tanh cdf at t == 0: a loose tolerance.
  np.testing.assert_allclose(out["vb"], want_vb, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)
  # DiT's choice: no T / 1000 rescaling by default; rescale_vb gives it.
  half = schedules.named_schedule("linear", 500)
  t_half = np.array([0, 1, 250, 499])
  a = losses.training_losses(half, lambda x, s: model(params, x, s), x0, t_half, noise,
                             learn_sigma=True)
  b = losses.training_losses(half, lambda x, s: model(params, x, s), x0, t_half, noise,
                             learn_sigma=True, rescale_vb=True)
  np.testing.assert_allclose(b["vb"], a["vb"] * 0.5, rtol=1e-6)

  # The vb term must not move the mean: the gradient of vb wrt the mean
  # parameter is exactly zero, while the variance parameter gets one.
  def vb_of(p):
    return losses.training_losses(linear, lambda x, s: model(p, x, s), x0, t, noise,
                                  learn_sigma=True)["vb"].sum()
  grads = jax.grad(vb_of)(params)
  assert float(grads["mean"]) == 0.0
  assert abs(float(grads["var"])) > 0


def test_schedule_validation():
  with pytest.raises(ValueError):
    schedules.get_beta_schedule("quadratic", 10)
  with pytest.raises(ValueError):
    DiffusionSchedule.from_betas([0.0, 0.1])
