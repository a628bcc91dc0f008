"""The one generic sharded train loop, shared by every task.

`train(task, config, workdir)` builds the mesh, initialises (or restores) the
train state directly onto its shards, runs one jitted step with explicit
in/out shardings, logs, checkpoints, evaluates, and returns the final results.
It knows nothing of any model: all of that is behind the task's interface.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm import tqdm

from multimodal.config import config_lib
from multimodal.data import pipeline
from multimodal.parallel import distributed, sharding
from multimodal.train import checkpoint, optim, preemption, pretrained, workdir as workdir_lib
from multimodal.train.metrics_writer import MetricsWriter


class TrainingDivergedError(RuntimeError):
  """The loss, the gradients or the update became NaN or infinite."""


NAN_POLICIES = ("stop", "skip")


def nan_policy(config) -> str:
  """`config.nan_policy`: what a step whose loss, gradients or update are
  not finite does. Either way its update is not applied, so the parameters (and every
  checkpoint) stay finite. "stop" (default) ends the run at the next log or
  checkpoint step, naming the first such step; "skip" goes on and counts the
  skipped updates in the `nonfinite_steps` metric."""
  policy = config.get("nan_policy") or "stop"
  if policy not in NAN_POLICIES:
    raise config_lib.ConfigError(
        f"config.nan_policy={policy!r} must be one of {NAN_POLICIES}.")
  return policy


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
             "opt_state": tx.init(params),
             # Steps whose update was dropped for a non-finite loss or
             # gradient, and the first of them (0: none yet).
             "health": {"nonfinite_steps": jnp.zeros((), jnp.int32),
                        "first_nonfinite_step": jnp.zeros((), jnp.int32)}}
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


def restore_state(mngr, abstract: dict):
  """(state, data_position) of the newest usable checkpoint; see
  checkpoint.restore. Checkpoints written before they carried integrity
  records also predate the state's `health` counters: those restore at zero."""
  if checkpoint.has_integrity_record(mngr, mngr.latest_step()):
    return checkpoint.restore(mngr, abstract)
  older = {k: v for k, v in abstract.items() if k != "health"}
  state, data_position = checkpoint.restore(mngr, older)
  state["health"] = jax.tree.map(
      lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding),
      abstract["health"])
  return state, data_position


def make_train_step(task, config, tx, schedule, state_shardings, mesh, *,
                    frozen_backward: bool = False):
  """The jitted step; the state's buffers are donated to the new state.
  `frozen_backward` differentiates frozen parameters too: the reference
  that tests/test_scale.py holds the frozen step to (the same update)."""
  freeze = None if frozen_backward else config.get("freeze")

  def train_step(state, batch):
    rng = step_rng(config, state["step"])
    batch = task.random_draws(batch, rng)
    (loss, metrics), grads = task.loss_and_grads(
        state["params"], batch, rng, grad_accum_steps(config), freeze=freeze)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    updated = {"params": params, "opt_state": opt_state}
    if "ema_params" in state:
      # Warmed up as in diffusers' EMAModel: an average that started at the
      # random init would carry it for ~1/(1 - decay) steps, and a mix of
      # very different early weights is no model at all (pure-noise samples).
      count = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay(config), (1 + count) / (10 + count))
      updated["ema_params"] = jax.tree.map(
          lambda e, p: decay * e + (1 - decay) * p, state["ema_params"], params)
    # A non-finite loss, gradient or update (a finite gradient can still
    # make one, through the learning rate or the optimizer's statistics)
    # drops the whole update: params, optimizer moments and average stay the
    # last finite ones, whatever the nan_policy, and the step is counted.
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             updated, {k: state[k] for k in updated})
    health = state["health"]
    new_state["health"] = {
        "nonfinite_steps": health["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (health["nonfinite_steps"] == 0) & ~finite, step,
            health["first_nonfinite_step"])}
    new_state["step"] = step
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "update_norm": update_norm, "learning_rate": schedule(state["step"]),
               **new_state["health"]}
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def _check_health(metrics: dict, policy: str, mngr) -> None:
  """Under nan_policy "stop", ends the run once a step was not finite."""
  count = int(metrics["nonfinite_steps"])
  if policy != "stop" or not count:
    return
  first = int(metrics["first_nonfinite_step"])
  last = mngr.latest_step()
  kept = (f"the last good checkpoint (step {last}) is kept in "
          f"{mngr.directory}" if last is not None else "no checkpoint was written yet")
  raise TrainingDivergedError(
      f"the loss, the gradients or the update became NaN or infinite at step {first} "
      f"({count} such step{'s' if count > 1 else ''} so far; their updates were "
      f"not applied); {kept}. Lower --config.lr, set --config.grad_clip_norm, "
      "or use --config.compute_dtype=float32, then rerun: the run resumes from "
      "that checkpoint. --config.nan_policy=skip instead skips such steps and "
      "counts them.")


def run_evaluators(evaluators, params, mesh) -> dict:
  results = {}
  with sharding.mesh_context(mesh):
    for evaluator in evaluators:
      for key, value in evaluator.run(params).items():
        results[f"{evaluator.name}/{key}"] = value
  return results


def _check_batch_divides(config, mesh) -> None:
  """Every microbatch (the whole batch without accumulation) spans every
  data-parallel device."""
  global_batch = config.input.batch_size
  micro, data_parallel = grad_accum_steps(config), sharding.data_parallel_size(mesh)
  if global_batch % (micro * data_parallel):
    times = f"config.grad_accum_steps={micro} x " if micro > 1 else ""
    raise config_lib.ConfigError(
        f"config.input.batch_size={global_batch} must be divisible by {times}the "
        f"{data_parallel} data-parallel devices of config.mesh={dict(config.mesh)}.")


def train(task, config, workdir: str) -> dict:
  """Trains `task` as `config` says, in `workdir`; returns the final results.

  SIGTERM/SIGINT (from here on, compilation included) save a checkpoint
  after the step in flight and raise preemption.Preempted; rerunning resumes
  from the newest valid checkpoint, bit-identically (the data order and every
  step's randomness are functions of the seed and the step).
  """
  with preemption.StopRequests() as stop_requests:
    return _train(task, config, workdir, stop_requests)


def _train(task, config, workdir: str, stop_requests) -> dict:
  start_time = time.time()
  mesh = sharding.make_mesh(config.mesh)
  total_steps = config_lib.total_steps(config, task.num_train_examples())
  _check_batch_divides(config, mesh)
  policy = nan_policy(config)
  keep = config.get("keep_ckpts", 2)

  with sharding.mesh_context(mesh):
    init_fn, state_shardings, tx, schedule = create_train_state(
        task, config, mesh, total_steps)
    abstract = checkpoint.abstract_like(jax.eval_shape(init_fn), state_shardings)
    # Before anything compiles: a workdir that cannot take the checkpoints
    # fails now, not at the first save.
    workdir_lib.check(workdir, checkpoint_bytes=workdir_lib.state_bytes(abstract),
                      checkpoints_kept=keep)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    train_step = make_train_step(task, config, tx, schedule, state_shardings, mesh)
    mngr = checkpoint.manager(workdir, save_interval_steps=config.ckpt_steps, keep=keep)
    resuming = mngr.latest_step() is not None
    if resuming:
      state, data_position = restore_state(mngr, abstract)
      print(f"Resuming from step {int(state['step'])} of {mngr.directory}.")
  if not resuming:
    # Read outside the mesh context: importers trace their own shapes, and
    # an earlier stage may first have to be trained, under its own mesh.
    weights = list(task.pretrained_params())
    with sharding.mesh_context(mesh):
      state = with_pretrained(weights, init_fn(), state_shardings)
    data_position = None
  start_step = int(state["step"])
  local_batch = config.input.batch_size // jax.process_count()

  writer = MetricsWriter(workdir, resume_step=start_step)
  evaluators = task.evaluators(mesh, workdir)
  # Where each shard's raw stream stands, and the records it skipped or
  # converted: exact across resumes even when bad records are dropped.
  shards = pipeline.Shards.of(sharding.batch_sharding(mesh))
  stream = pipeline.StreamTracker.restore(data_position, shards, local_batch)
  max_skipped = config.input.get("max_skipped_fraction",
                                 pipeline.DEFAULT_MAX_SKIPPED_FRACTION)
  ds = task.train_dataset(
      start_positions=stream.start_positions(),
      local_batch_size=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count(), shards=shards)
  batches = pipeline.iterate_global(ds, sharding.batch_sharding(mesh),
                                    what=f"{config.input.data}[{config.input.split}]")
  log_every = config.get("log_steps", 50)
  eval_every = config.get("eval_every") or 0
  progress = tqdm(total=total_steps, initial=start_step, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  step = start_step
  try:
    with sharding.mesh_context(mesh):
      observed = (stream.observe(batch) for batch in batches)
      if jax.process_count() > 1 and start_step < total_steps:
        observed = _compiled_and_met(train_step, state, observed)
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(observed))
        progress.update(1)
        is_last = step == total_steps
        stopping = stop_requests.requested(step)
        saving = is_last or stopping or mngr.should_save(step)
        if step % log_every == 0 or saving:
          metrics = {**jax.device_get(metrics), **stream.metrics()}
          _check_health(metrics, policy, mngr)
          writer.write(step, metrics)
          stream.check(max_skipped)
          progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if saving:
          checkpoint.save(mngr, step, state, stream.to_json(),
                          force=is_last or stopping)
        if stopping:
          mngr.wait_until_finished()
          raise preemption.Preempted(step, stop_requests.signal_name, mngr.directory)
        if eval_every and step % eval_every == 0 and not is_last:
          writer.write(step, run_evaluators(evaluators, eval_params(state), mesh))
  except BaseException:
    writer.close()
    raise
  finally:
    batches.close()  # Stops the input thread before anything else ends.
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


def _compiled_and_met(train_step, state, observed):
  """`observed` again, after every process has its first batch and its train
  step compiled: the step's first collectives then find the others there,
  rather than timing out while one of them still reads or compiles."""
  first = next(observed)
  train_step.lower(state, first).compile()  # Shared with train_step's cache.
  distributed.wait_for_all("multimodal.train.trainer.first_step")
  return itertools.chain([first], observed)


def restore_latest(task, config, workdir: str, mesh) -> dict:
  """The train state of `workdir`'s latest checkpoint, sharded on `mesh`."""
  total_steps = config_lib.total_steps(config, task.num_train_examples())
  with sharding.mesh_context(mesh):
    init_fn, state_shardings, _, _ = create_train_state(task, config, mesh, total_steps)
    mngr = checkpoint.manager(workdir, read_only=True)
    abstract = checkpoint.abstract_like(jax.eval_shape(init_fn), state_shardings)
    state, _ = restore_state(mngr, abstract)
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
