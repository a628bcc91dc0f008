"""The one generic sharded train loop, shared by every task.

`train(task, config, workdir)` builds the mesh, initialises (or restores) the
train state directly onto its shards, runs one jitted step with explicit
in/out shardings, logs, checkpoints, evaluates, and returns the final results.
It knows nothing of any model: all of that is behind the task's interface.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm import tqdm

from multimodal import checkpoint, config_lib, optim, pretrained, sharding
from multimodal.data import pipeline
from multimodal.metrics_writer import MetricsWriter


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite."""


def ema_decay(config) -> float | None:
  """`config.ema_decay`: keep an exponential moving average of the params
  (updated after every step with decay min(ema_decay, (1 + step) / (10 +
  step)), checkpointed, and the params every evaluator sees), or None."""
  decay = config.get("ema_decay")
  if decay is not None and not 0.0 <= decay < 1.0:
    raise config_lib.ConfigError(
        f"config.ema_decay={decay} must be in [0, 1) (e.g. 0.9999), or None.")
  return decay


def grad_accum_steps(config) -> int:
  """`config.grad_accum_steps`: microbatches per step (see accumulate.py)."""
  k = config.get("grad_accum_steps") or 1
  if not isinstance(k, int) or k < 1:
    raise config_lib.ConfigError(
        f"config.grad_accum_steps={k!r} must be a positive int (1: no accumulation).")
  return k


def params_sha256(params) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes, in sorted
  path order: equal digests mean bit-identical parameters, so two runs can be
  compared without opening a checkpoint."""
  from jax.experimental import multihost_utils
  digest = hashlib.sha256()
  for path, value in sorted(optim.param_paths(params).items()):
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      value = multihost_utils.process_allgather(value, tiled=True)
    array = np.ascontiguousarray(jax.device_get(value))
    digest.update(f"{path}:{array.dtype}:{array.shape}:".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def eval_params(state: dict):
  """The params evaluators see: the moving average when there is one."""
  return state.get("ema_params", state["params"])


def create_train_state(task, config, mesh, total_steps: int):
  """Returns (init_fn, state_shardings, optimizer, schedule).

  Shapes and shardings come from `jax.eval_shape`, so no parameter is ever
  materialised unsharded: init runs under jit straight into its shards.
  """
  rng = jax.random.key(config.seed)
  boxed_params = jax.eval_shape(task.init, rng)
  tx, schedule = optim.make_optimizer(
      config, sharding.strip_boxes(boxed_params), total_steps)

  def init_boxed_state(rng):
    params = task.init(rng)
    # The optimizer state mirrors the params, boxes (and so shardings) included.
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params)}
    if ema_decay(config) is not None:
      state["ema_params"] = params  # Same boxes, so sharded like the params.
    return state

  state_shardings = sharding.logical_shardings(
      jax.eval_shape(init_boxed_state, rng), mesh)
  init_fn = jax.jit(lambda rng: nn.unbox(init_boxed_state(rng)),
                    out_shardings=state_shardings)
  return (lambda: init_fn(rng)), state_shardings, tx, schedule


def with_pretrained(pretrained_params, state: dict, state_shardings: dict) -> dict:
  """A fresh state with a task's pretrained weights ((what, tree) pairs)
  put in, in the params and in their moving average alike."""
  for what, weights in pretrained_params:
    print(f"Initialising from {what}.")
    for key in ("params", "ema_params"):
      if key in state:
        state[key] = pretrained.merge(state[key], weights, state_shardings[key], what)
  return state


def step_rng(config, step):
  """The randomness of train step `step`: a function of the seed and the
  step alone, so a resumed run draws what the uninterrupted one did."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), step)


def make_train_step(task, config, tx, schedule, state_shardings, mesh):
  def train_step(state, batch):
    rng = step_rng(config, state["step"])
    batch = task.random_draws(batch, rng)
    (loss, metrics), grads = task.loss_and_grads(
        state["params"], batch, rng, grad_accum_steps(config))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    new_state = {"step": state["step"] + 1, "params": params,
                 "opt_state": opt_state}
    if "ema_params" in state:
      # Warmed up as in diffusers' EMAModel: an average that started at the
      # random init would carry it for ~1/(1 - decay) steps, and a mix of
      # very different early weights is no model at all (pure-noise samples).
      step = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay(config), (1 + step) / (10 + step))
      new_state["ema_params"] = jax.tree.map(
          lambda e, p: decay * e + (1 - decay) * p, state["ema_params"], params)
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def _check_finite(metrics: dict, step: int, mngr) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    last = mngr.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in "
            f"{mngr.directory}" if last is not None else "no checkpoint was written yet")
    raise TrainingDivergedError(
        f"the loss became {loss} at step {step}; {kept}, and no state after "
        "the divergence was saved. Lower --config.lr, set "
        "--config.grad_clip_norm, or use --config.compute_dtype=float32, then "
        "rerun: the run resumes from that checkpoint.")


def run_evaluators(evaluators, params, mesh) -> dict:
  results = {}
  with sharding.mesh_context(mesh):
    for evaluator in evaluators:
      for key, value in evaluator.run(params).items():
        results[f"{evaluator.name}/{key}"] = value
  return results


def train(task, config, workdir: str) -> dict:
  """Trains `task` as `config` says, in `workdir`; returns the final results."""
  start_time = time.time()
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  total_steps = config_lib.total_steps(config, task.num_train_examples())
  global_batch = config.input.batch_size
  # Every microbatch (the whole batch without accumulation) spans every
  # data-parallel device.
  micro, data_parallel = grad_accum_steps(config), sharding.data_parallel_size(mesh)
  if global_batch % (micro * data_parallel):
    times = f"config.grad_accum_steps={micro} x " if micro > 1 else ""
    raise config_lib.ConfigError(
        f"config.input.batch_size={global_batch} must be divisible by {times}the "
        f"{data_parallel} data-parallel devices of config.mesh={dict(config.mesh)}.")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))

  with sharding.mesh_context(mesh):
    init_fn, state_shardings, tx, schedule = create_train_state(
        task, config, mesh, total_steps)
    train_step = make_train_step(task, config, tx, schedule, state_shardings, mesh)
    mngr = checkpoint.manager(workdir, save_interval_steps=config.ckpt_steps,
                              keep=config.get("keep_ckpts", 2))
    resuming = mngr.latest_step() is not None
    if resuming:
      abstract = checkpoint.abstract_like(
          jax.eval_shape(init_fn), state_shardings)
      state, data_position = checkpoint.restore(mngr, abstract)
      print(f"Resuming from step {int(state['step'])} of {mngr.directory}.")
  if not resuming:
    # Read outside the mesh context: importers trace their own shapes, and
    # an earlier stage may first have to be trained, under its own mesh.
    weights = list(task.pretrained_params())
    with sharding.mesh_context(mesh):
      state = with_pretrained(weights, init_fn(), state_shardings)
    data_position = {"examples_per_process": 0}
  start_step = int(state["step"])
  local_batch = global_batch // jax.process_count()

  writer = MetricsWriter(workdir)
  evaluators = task.evaluators(mesh, workdir)
  ds = task.train_dataset(
      start_example=data_position["examples_per_process"],
      local_batch_size=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count(),
      shards=pipeline.Shards.of(sharding.batch_sharding(mesh)))
  batches = pipeline.iterate_global(ds, sharding.batch_sharding(mesh),
                                    what=f"{config.input.data}[{config.input.split}]")
  log_every = config.get("log_steps", 50)
  eval_every = config.get("eval_every") or 0
  progress = tqdm(total=total_steps, initial=start_step, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  step = start_step
  try:
    with sharding.mesh_context(mesh):
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        progress.update(1)
        is_last = step == total_steps
        if step % log_every == 0 or is_last or step % config.ckpt_steps == 0:
          metrics = jax.device_get(metrics)
          _check_finite(metrics, step, mngr)
          writer.write(step, metrics)
          progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        checkpoint.save(mngr, step, state,
                        {"examples_per_process": step * local_batch},
                        force=is_last)
        if eval_every and step % eval_every == 0 and not is_last:
          writer.write(step, run_evaluators(evaluators, eval_params(state), mesh))
  finally:
    progress.close()
    mngr.wait_until_finished()

  results = run_evaluators(evaluators, eval_params(state), mesh)
  writer.write(step, results)
  writer.close()
  summary = {"step": step, "total_steps": total_steps,
             "wall_time_seconds": round(time.time() - start_time, 1),
             "params_sha256": params_sha256(state["params"]),
             "metrics": results}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(summary, f, indent=2)
  mngr.close()
  return summary


def restore_latest(task, config, workdir: str, mesh) -> dict:
  """The train state of `workdir`'s latest checkpoint, sharded on `mesh`."""
  total_steps = config_lib.total_steps(config, task.num_train_examples())
  with sharding.mesh_context(mesh):
    init_fn, state_shardings, _, _ = create_train_state(task, config, mesh, total_steps)
    mngr = checkpoint.manager(workdir, read_only=True)
    abstract = checkpoint.abstract_like(jax.eval_shape(init_fn), state_shardings)
    state, _ = checkpoint.restore(mngr, abstract)
  return state


def evaluate(task, config, workdir: str) -> dict:
  """Re-runs the task's evaluators on the latest checkpoint of `workdir`."""
  mesh = sharding.make_mesh(config.mesh)
  state = restore_latest(task, config, workdir, mesh)
  results = run_evaluators(task.evaluators(mesh, workdir), eval_params(state), mesh)
  summary = {"step": int(state["step"]), "metrics": results}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
