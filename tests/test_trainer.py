"""The generic trainer: a sharded step equals the single-device step, and a
run that dies resumes from its checkpoint to the same final parameters."""
import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_clip_config
from multimodal import sharding, trainer
from multimodal.data import pipeline


def _one_step(task, config, mesh, local_batch):
  """(gradients, params after one step, metrics) on `mesh`."""
  with sharding.mesh_context(mesh):
    init_fn, shardings, tx, schedule = trainer.create_train_state(
        task, config, mesh, total_steps=10)
    step = trainer.make_train_step(task, config, tx, schedule, shardings, mesh)
    batch = pipeline.to_global_arrays(local_batch, sharding.batch_sharding(mesh))
    state = init_fn()
    grad_fn = jax.jit(jax.grad(lambda p, b: task.loss_fn(p, b, jax.random.key(0))[0]))
    grads = jax.device_get(grad_fn(state["params"], batch))
    state, metrics = step(state, batch)
  return grads, jax.device_get(state["params"]), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(clip_task):
  config = clip_task.config.copy_and_resolve_references()
  config.schedule.warmup_steps = 0  # So the first step moves the params.
  ds = clip_task.train_dataset(start_example=0, local_batch_size=32,
                               process_index=0, process_count=1)
  local_batch = next(ds.as_numpy_iterator())
  assert len(jax.devices()) == 8
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": -1})
  grads_1, params_1, metrics_1 = _one_step(clip_task, config, single, local_batch)
  grads_8, params_8, metrics_8 = _one_step(clip_task, config, eight, local_batch)
  np.testing.assert_allclose(metrics_1["loss"], metrics_8["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_1["grad_norm"], metrics_8["grad_norm"], rtol=1e-4)
  # Gradients agree to float tolerance. Some are analytically zero and hold
  # only rounding noise, so the tolerance is relative to the largest gradient.
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-3),
               grads_1, grads_8)
  # Adam's first update is lr * g / (|g| + eps): for gradients near float
  # noise its sign can flip, so parameters agree to within 2 * lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2 * config.lr),
               params_1, params_8)
  init_fn, *_ = trainer.create_train_state(clip_task, config, single, 10)
  before = jax.device_get(init_fn()["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                       before, params_1))
  assert max(moved) > 0.5 * config.lr  # The step really updated the params.


def test_ema_params_follow_the_closed_form_average(clip_task):
  config = clip_task.config.copy_and_resolve_references()
  config.schedule.warmup_steps = 0
  config.ema_decay = 0.9
  mesh = sharding.make_mesh({"data": -1})
  ds = clip_task.train_dataset(start_example=0, local_batch_size=32,
                               process_index=0, process_count=1)
  with sharding.mesh_context(mesh):
    init_fn, shardings, tx, schedule = trainer.create_train_state(
        clip_task, config, mesh, total_steps=10)
    step = trainer.make_train_step(clip_task, config, tx, schedule, shardings, mesh)
    state = init_fn()
    # Params are donated by the step, so keep host copies along the way.
    history = [jax.device_get(state["params"])]
    for batch in list(ds.take(3).as_numpy_iterator()):
      state, _ = step(state, pipeline.to_global_arrays(batch, sharding.batch_sharding(mesh)))
      history.append(jax.device_get(state["params"]))
  # ema_{k+1} = d_k ema_k + (1 - d_k) p_{k+1}, d_k = min(0.9, (1+k)/(10+k)).
  def average(*params):
    ema = params[0]
    for k, p in enumerate(params[1:]):
      d = min(0.9, (1 + k) / (10 + k))
      ema = d * ema + (1 - d) * p
    return ema
  expected = jax.tree.map(average, *history)
  ema = jax.device_get(state["ema_params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               ema, expected)
  assert trainer.eval_params(state) is state["ema_params"]
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                           history[0], history[3])))
  assert moved > 0  # The average really moved with the params.


def test_ema_decay_out_of_range_is_a_config_error(clip_task):
  config = clip_task.config.copy_and_resolve_references()
  config.ema_decay = 1.5
  with pytest.raises(Exception, match="ema_decay"):
    trainer.create_train_state(clip_task, config, sharding.make_mesh({"data": -1}), 10)


class _Crash(Exception):
  pass


def _no_eval_config(data_dir, steps):
  config = tiny_clip_config(data_dir, f"steps={steps}")
  config.evals = ml_collections.ConfigDict()
  config.ckpt_steps = 10
  return config


def test_resume_after_crash_reaches_the_same_parameters(clip_task, tmp_path, monkeypatch):
  config = _no_eval_config(clip_task.config.input.data_dir, steps=20)
  clip_task.config = config  # Same model and tokenizer, no evaluators.
  try:
    straight = tmp_path / "straight"
    trainer.train(clip_task, config, str(straight))

    # Crash while fetching the 13th batch: steps 1-12 ran, step 10 was saved.
    real_iterate = pipeline.iterate_global
    def crashing_iterate(*args, **kwargs):
      for i, batch in enumerate(real_iterate(*args, **kwargs)):
        if i == 12:
          raise _Crash()
        yield batch
    monkeypatch.setattr(pipeline, "iterate_global", crashing_iterate)
    resumed = tmp_path / "resumed"
    with pytest.raises(_Crash):
      trainer.train(clip_task, config, str(resumed))
    monkeypatch.setattr(pipeline, "iterate_global", real_iterate)
    summary = trainer.train(clip_task, config, str(resumed))
  finally:
    clip_task.config = tiny_clip_config(clip_task.config.input.data_dir)
  assert summary["step"] == 20
  assert (resumed / "checkpoints" / "10").exists()

  mesh = sharding.make_mesh(config.mesh)
  def final_params(workdir):
    from multimodal import checkpoint
    with sharding.mesh_context(mesh):
      init_fn, shardings, _, _ = trainer.create_train_state(clip_task, config, mesh, 20)
      mngr = checkpoint.manager(str(workdir), read_only=True)
      state, position = checkpoint.restore(
          mngr, checkpoint.abstract_like(jax.eval_shape(init_fn), shardings))
    assert int(state["step"]) == 20 and position["examples_per_process"] == 20 * 32
    return jax.device_get(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               final_params(straight), final_params(resumed))
  lines = (resumed / "metrics.jsonl").read_text().splitlines()
  assert any('"step": 15' in line for line in lines)
  assert (resumed / "config.json").exists()
  assert (resumed / "tensorboard").is_dir()


def test_nan_loss_stops_with_a_clear_error(clip_task, tmp_path):
  config = _no_eval_config(clip_task.config.input.data_dir, steps=10)
  config.lr = float("nan")
  clip_task.config = config
  try:
    with pytest.raises(trainer.TrainingDivergedError, match="loss became nan at step 5"):
      trainer.train(clip_task, config, str(tmp_path / "nan"))
  finally:
    clip_task.config = tiny_clip_config(clip_task.config.input.data_dir)
  # Nothing after the divergence was saved.
  assert not (tmp_path / "nan" / "checkpoints" / "10").exists()


def test_bfloat16_compute_keeps_float32_params(clip_task):
  from multimodal.tasks import clip
  config = clip_task.config.copy_and_resolve_references()
  config.compute_dtype = "bfloat16"
  bf16_task = clip.ContrastiveTask(config)
  ds = bf16_task.train_dataset(start_example=0, local_batch_size=32,
                               process_index=0, process_count=1)
  local_batch = next(ds.as_numpy_iterator())
  mesh = sharding.make_mesh({"data": -1})
  _, params, metrics = _one_step(bf16_task, config, mesh, local_batch)
  _, _, metrics_f32 = _one_step(clip_task, clip_task.config, mesh, local_batch)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  assert np.isfinite(metrics["loss"])
  # Same init and batch: bf16 activations change the loss only by rounding.
  np.testing.assert_allclose(metrics["loss"], metrics_f32["loss"], rtol=0.05)


def test_params_sha256_digests_every_array_in_path_order():
  import hashlib
  params = {"b": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "a": {"bias": np.ones(3, np.float32)}}
  want = hashlib.sha256()
  for path, array in (("a/bias", params["a"]["bias"]), ("b/kernel", params["b"]["kernel"])):
    want.update(f"{path}:{array.dtype}:{array.shape}:".encode())
    want.update(array.tobytes())
  assert trainer.params_sha256(params) == want.hexdigest()
  assert trainer.params_sha256({"a": params["a"], "b": params["b"]}) == want.hexdigest()
  nudged = {"a": {"bias": np.nextafter(params["a"]["bias"], 2)}, "b": params["b"]}
  assert trainer.params_sha256(nudged) != want.hexdigest()
