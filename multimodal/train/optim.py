"""The optax chain a config describes: clipping, AdamW with a weight-decay
mask, and warmup followed by a decay. Nothing here is hand-written optimizer
math; it only assembles optax pieces.
"""
from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util

from multimodal.config import config_lib


def param_paths(params) -> dict:
  """{'img/encoder/block00/mlp/Dense_0/kernel': leaf, ...}."""
  return {"/".join(map(str, k)): v
          for k, v in traverse_util.flatten_dict(params).items()}


def path_mask(params, pattern: str):
  """A pytree of bools, True where a parameter's '/'-joined path matches."""
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(params)
  mask = {k: bool(regex.fullmatch("/".join(map(str, k)))) for k in flat}
  return traverse_util.unflatten_dict(mask)


def without_frozen_gradients(fn, freeze: str | None):
  """`fn(params, *args)`, to be differentiated, with the parameters that
  `freeze` names (make_optimizer's config.freeze) as constants. Their
  gradients are then symbolic zeros, so the backward pass computes neither
  them nor anything only they need: a frozen vision tower below a trained
  projector loses its whole backward pass. The optimizer ignores their
  gradients anyway (set_to_zero), so the updates are the same."""
  if not freeze:
    return fn

  def with_constants(params, *args):
    constant = path_mask(params, freeze)
    return fn(jax.tree.map(lambda p, c: jax.lax.stop_gradient(p) if c else p,
                           params, constant), *args)
  return with_constants


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  sched = config.schedule
  warmup = int(sched.warmup_steps)
  if sched.decay_type == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * sched.get("min_lr_ratio", 0.0))
  if sched.decay_type == "linear":
    return optax.join_schedules([
        optax.linear_schedule(0.0, config.lr, warmup),
        optax.linear_schedule(config.lr, config.lr * sched.get("min_lr_ratio", 0.0),
                              max(total_steps - warmup, 1))], [warmup])
  if sched.decay_type == "constant":
    return optax.join_schedules([
        optax.linear_schedule(0.0, config.lr, warmup),
        optax.constant_schedule(config.lr)], [warmup])
  raise ValueError(
      f"config.schedule.decay_type={sched.decay_type!r} is not one of "
      "'cosine', 'linear', 'constant'.")


def lr_multiplier_labels(params, lr_mults) -> dict:
  """A pytree of labels "lr*<mult>": the multiplier of the first
  (pattern, multiplier) pair of `lr_mults` whose regex matches a param's
  '/'-joined path, 1.0 when none does (big_vision's `lr_mults`)."""
  rules = [(re.compile(pattern), float(mult)) for pattern, mult in lr_mults]
  flat = traverse_util.flatten_dict(params)
  labels = {}
  for key in flat:
    path = "/".join(map(str, key))
    mult = next((m for regex, m in rules if regex.fullmatch(path)), 1.0)
    labels[key] = f"lr*{mult!r}"
  return traverse_util.unflatten_dict(labels)


def make_optimizer(config, params, total_steps: int):
  """Returns (optax transformation, learning-rate schedule).

  `config.freeze` (a regex over '/'-joined param paths, or None) names
  parameters that never change: they get no update, no weight decay and no
  optimizer state (e.g. a pretrained text encoder inside a DiT's params).
  `config.lr_mults` ((regex, multiplier) pairs, first match wins) scales the
  learning rate of parameter groups, e.g. (("llm/.*", 0.1),) tunes a
  pretrained LM ten times more gently than a fresh projector.
  """
  schedule = learning_rate_schedule(config, total_steps)
  freeze = config.get("freeze")
  if freeze:
    frozen = path_mask(params, freeze)
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
    return optax.multi_transform(
        {"trained": _trainable_optimizer(config, schedule), "frozen": optax.set_to_zero()},
        labels), schedule
  return _trainable_optimizer(config, schedule), schedule


def _trainable_optimizer(config, schedule):
  # Decay only the parameters the pattern names (by default the matmul
  # kernels): decaying norms, biases and the temperature hurts, as in CLIP.
  # A callable, because under config.freeze it sees the trained subtree only.
  def decay_mask(params):
    return path_mask(params, config.wd_mask)
  parts = []
  if config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
      eps=config.get("adam_eps", 1e-8), weight_decay=config.wd, mask=decay_mask))
  lr_mults = config.get("lr_mults")
  if lr_mults:
    config_lib.check_lr_mults(lr_mults)
    # AdamW's update is -lr * (adam step + wd * param): scaling it by a
    # group's multiplier is that group running at lr * multiplier, weight
    # decay included, as a PyTorch param group's lr would.
    mults = {f"lr*{float(m)!r}": float(m) for _, m in lr_mults}
    mults["lr*1.0"] = 1.0
    parts.append(optax.multi_transform(
        {label: optax.scale(m) for label, m in mults.items()},
        lambda params: lr_multiplier_labels(params, lr_mults)))
  return optax.chain(*parts)

