"""The generic trainer: the EMA, a run that dies resuming from its checkpoint
to the same final parameters, NaN losses, and the parameter digest. (A
sharded step equals the one-device step for every family: test_scale.py.)"""
import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_clip_config
from multimodal.data import pipeline
from multimodal.parallel import sharding
from multimodal.train import trainer

pytestmark = pytest.mark.unit


def test_ema_params_follow_the_closed_form_average(clip_task):
  config = clip_task.config.copy_and_resolve_references()
  config.schedule.warmup_steps = 0
  config.ema_decay = 0.9
  mesh = sharding.make_mesh({"data": -1})
  ds = clip_task.train_dataset(local_batch_size=32,
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
    from multimodal.train import checkpoint
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
