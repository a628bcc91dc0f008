"""The optimizer a config describes: weight-decay mask and frozen params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from multimodal.train import optim

pytestmark = pytest.mark.unit


def config(**overrides):
  return config_dict.ConfigDict(dict(
      lr=0.1, wd=0.5, wd_mask=r".*/kernel", grad_clip_norm=None,
      schedule=dict(warmup_steps=0, decay_type="constant"), **overrides))


PARAMS = {"encoder": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
          "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}


def test_frozen_params_get_no_update_no_decay_and_no_optimizer_state():
  tx, _ = optim.make_optimizer(config(freeze=r"encoder/.*"), PARAMS, 10)
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  for leaf in jax.tree.leaves(updates["encoder"]):
    np.testing.assert_array_equal(leaf, 0.0)
  # Adam's first step is -lr * sign(g); decoupled decay adds -lr * wd * p on
  # kernels only.
  np.testing.assert_allclose(updates["head"]["bias"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1 - 0.1 * 0.5, rtol=1e-5)
  # Adam moments exist for the trained params only.
  moment_leaves = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in moment_leaves) == 2 * (4 + 2)


def test_without_freeze_every_param_trains():
  tx, _ = optim.make_optimizer(config(), PARAMS, 10)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert all(float(jnp.abs(u).min()) > 0 for u in jax.tree.leaves(updates))


def test_lr_mults_scale_a_group_weight_decay_included():
  """First match wins; under freeze too (the group rule then sees only the
  trained subtree)."""
  mults = (("head/kernel", 0.1), ("head/.*", 0.5))
  for freeze in (None, r"encoder/dense/bias"):
    tx, _ = optim.make_optimizer(config(lr_mults=mults, freeze=freeze), PARAMS, 10)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["head"]["kernel"], 0.1 * (-0.1 - 0.1 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(updates["head"]["bias"], 0.5 * -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["encoder"]["dense"]["kernel"], -0.1 - 0.1 * 0.5,
                               rtol=1e-5)
    want_bias = 0.0 if freeze else -0.1
    np.testing.assert_allclose(updates["encoder"]["dense"]["bias"], want_bias, atol=1e-6)


def test_bad_lr_mults_are_named():
  import pytest
  for bad, match in ((("head/.*", 0.1), "pairs"), ((("head/[", 0.1),), "not a regex")):
    with pytest.raises(ValueError, match=match):
      optim.make_optimizer(config(lr_mults=bad), PARAMS, 10)


def test_frozen_params_cost_no_backward_work():
  """A frozen encoder below a trained head: its gradients are exact zeros
  and the backward pass computes neither them nor the gradient of its
  input, so the traced matmuls are the forward's 2 plus the head's weight
  gradient; the head's gradient is the unfrozen one."""
  from multimodal.perf import flops
  x = jnp.arange(6.0).reshape(3, 2)

  def loss(params):
    h = jnp.tanh(x @ params["encoder"]["dense"]["kernel"] + params["encoder"]["dense"]["bias"])
    return jnp.sum((h @ params["head"]["kernel"] + params["head"]["bias"]) ** 2)

  frozen_grad = jax.grad(optim.without_frozen_gradients(loss, r"encoder/.*"))
  grads, full = frozen_grad(PARAMS), jax.grad(loss)(PARAMS)
  for leaf in jax.tree.leaves(grads["encoder"]):
    np.testing.assert_array_equal(leaf, 0.0)
  jax.tree.map(np.testing.assert_array_equal, grads["head"], full["head"])
  one = 2 * 3 * 2 * 2  # Any of the [3, 2] x [2, 2] matmuls.
  assert flops.jaxpr_matmul_flops(jax.grad(loss), PARAMS) == 5 * one  # 2 fwd + 3 bwd.
  assert flops.jaxpr_matmul_flops(frozen_grad, PARAMS) == 3 * one
  assert optim.without_frozen_gradients(loss, None) is loss
