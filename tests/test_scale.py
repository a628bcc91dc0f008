"""Scale-out invariants, for every family (CLIP, SigLIP, DiT, the VLM, the
ViT classifier): one train step gives the same loss, gradients and updated
parameters on one device and on the meshes data=8, fsdp=8 and data=2 x
fsdp=2 x tensor=2; gradient accumulation over microbatches equals the
large-batch step; every rematerialisation policy leaves the gradients
unchanged; bf16 compute keeps f32 master weights; and FSDP divides the
per-device bytes of parameters plus optimizer state by the fsdp size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_WORLD, tiny_clip_config
from multimodal import config_lib, sharding, trainer
from multimodal.data import pipeline
from multimodal.models import layers
from multimodal.tasks import classify, clip, dit, vlm

FAMILIES = ("clip", "siglip", "dit", "vlm", "classifier")
MESHES = {
    "data=8": {"data": 8},
    "fsdp=8": {"fsdp": 8},
    "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}
BATCH = 32


def family_config(name, data_dir, clip_workdir):
  if name in ("clip", "siglip"):
    return tiny_clip_config(data_dir, "loss=sigmoid" if name == "siglip" else "")
  specs = {
      "dit": "configs/dit_shapes.py:variant=mu/8,steps=10,res=32,batch=32",
      "vlm": "configs/vlm_shapes.py:stage=tune,steps=10,res=32,batch=32",
      "classifier": "configs/shapes_classifier.py:variant=mu/8,steps=10,res=32,batch=32",
  }
  config = config_lib.load_config_file(specs[name])
  with config.unlocked():
    config.input.data_dir = data_dir
    config.input.shapes_world = dict(TINY_WORLD)
    config.input.shuffle_buffer = 100
    if name == "vlm":
      config.model.vision.workdir = clip_workdir
      config.freeze = None  # Every parameter, the vision tower's too, gets a gradient.
  return config


def make_task(config):
  return {"clip": clip.ContrastiveTask, "dit": dit.DiffusionTask,
          "vlm": vlm.VisionLanguageTask, "classify": classify.ClassificationTask}[config.task](config)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, data_dir, clip_workdir):
  """(name, task, config, one local batch, the single-device reference step)."""
  config = family_config(request.param, data_dir, clip_workdir)
  config.schedule.warmup_steps = 0  # So that the first step moves the params.
  task = make_task(config)
  ds = task.train_dataset(start_example=0, local_batch_size=BATCH, process_index=0,
                          process_count=1)
  batch = next(ds.as_numpy_iterator())
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  return request.param, task, config, batch, one_step(task, config, single, batch)


def one_step(task, config, mesh, local_batch):
  """(loss, gradients, params after one train step) on `mesh`, on host."""
  with sharding.mesh_context(mesh):
    init_fn, shardings, tx, schedule = trainer.create_train_state(task, config, mesh, 10)
    step = trainer.make_train_step(task, config, tx, schedule, shardings, mesh)
    batch = pipeline.to_global_arrays(local_batch, sharding.batch_sharding(mesh))
    state = init_fn()

    def loss_and_grads(params, batch):
      rng = trainer.step_rng(config, 0)  # The first step's, as in `step` below.
      (loss, _), grads = task.loss_and_grads(
          params, task.random_draws(batch, rng), rng, trainer.grad_accum_steps(config))
      return loss, grads
    loss, grads = jax.device_get(jax.jit(loss_and_grads)(state["params"], batch))
    state, metrics = step(state, batch)
    params = jax.device_get(state["params"])
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)  # The step's own loss.
  return loss, grads, params


def assert_same_step(got, want, lr):
  (loss, grads, params), (want_loss, want_grads, want_params) = got, want
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  # Some gradients are analytically zero and hold only rounding noise, so
  # the tolerance is relative to the largest gradient.
  scale = max(np.abs(g).max() for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=2e-3),
               grads, want_grads)
  # Adam's first update is lr * g / (|g| + eps): for a gradient near float
  # noise its sign can flip, so parameters agree to within 2 * lr...
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2 * lr), params, want_params)
  # ... but nearly all of them far more closely.
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in
                          zip(jax.tree.leaves(params), jax.tree.leaves(want_params))])
  assert np.mean(diffs < 1e-3 * lr) > 0.95, np.mean(diffs < 1e-3 * lr)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_a_step_is_the_same_on_every_mesh(family, mesh_name):
  _, task, config, batch, reference = family
  config = config.copy_and_resolve_references()
  config.mesh = MESHES[mesh_name]
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.devices.size == 8
  assert_same_step(one_step(task, config, mesh, batch), reference, config.lr)


def test_gradient_accumulation_equals_the_large_batch_step(family):
  """4 microbatches of 8 on data=2 x fsdp=2 x tensor=2 (2 examples per
  device each) against the batch of 32 at once on one device."""
  _, task, config, batch, reference = family
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 4
  config.mesh = MESHES["data=2,fsdp=2,tensor=2"]
  assert_same_step(one_step(task, config, sharding.make_mesh(config.mesh), batch),
                   reference, config.lr)


def test_microbatches_must_span_the_data_parallel_devices(family, tmp_path):
  _, task, config, _, _ = family
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 8  # 32 / 8 = 4 examples per microbatch, 8 devices.
  config.mesh = {"data": 8}
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=8"):
    trainer.train(task, config, str(tmp_path))


@pytest.mark.parametrize("policy", sorted(set(layers.REMAT_POLICIES) - {"none"}))
def test_remat_policies_leave_the_step_unchanged(family, policy):
  name, _, config, batch, reference = family
  if name in ("siglip", "classifier") and policy != "full":
    pytest.skip("the same transformer blocks as CLIP's")
  config = config.copy_and_resolve_references()
  config.remat = policy
  task = make_task(config)
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  jaxpr = str(jax.make_jaxpr(lambda p, b: task.loss_and_grads(
      p, task.random_draws(b, jax.random.key(0)), jax.random.key(0), 1))(
          sharding.strip_boxes(jax.eval_shape(task.init, jax.random.key(0))),
          jax.tree.map(jnp.asarray, batch)))
  assert "remat" in jaxpr or "checkpoint" in jaxpr  # The policy is really applied.
  loss, grads, params = one_step(task, config, single, batch)
  np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(reference[1]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=1e-4),
               grads, reference[1])


def test_bf16_compute_keeps_f32_master_weights(family):
  _, _, config, batch, reference = family
  config = config.copy_and_resolve_references()
  config.compute_dtype = "bfloat16"
  task = make_task(config)
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  params = sharding.strip_boxes(jax.eval_shape(task.init, jax.random.key(0)))
  jaxpr = str(jax.make_jaxpr(lambda p, b: task.loss_fn(
      p, task.random_draws(b, jax.random.key(0)), jax.random.key(0)))(
          params, jax.tree.map(jnp.asarray, batch)))
  assert "bf16[" in jaxpr and "dot_general" in jaxpr  # Matmuls run in bf16...
  loss, _, after = one_step(task, config, single, batch)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(after))  # ... on f32 weights,
  np.testing.assert_allclose(loss, reference[0], rtol=0.05)  # to bf16 precision.


def test_fsdp_divides_parameter_and_optimizer_bytes(family):
  """Per-device bytes of params + optimizer state, read off the arrays'
  addressable shards: about 1/8 of the replicated run's under fsdp=8."""
  name, task, config, _, _ = family

  def bytes_on_device0(mesh_config):
    config_ = config.copy_and_resolve_references()
    config_.mesh = mesh_config
    mesh = sharding.make_mesh(mesh_config)
    with sharding.mesh_context(mesh):
      init_fn, *_ = trainer.create_train_state(task, config_, mesh, 10)
      state = init_fn()
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves({k: state[k] for k in ("params", "opt_state")}):
      total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total

  replicated = bytes_on_device0({"data": 8})
  sharded = bytes_on_device0({"fsdp": 8})
  # Small leaves (norm scales of the odd axis, the temperature, the step
  # counts) stay replicated; everything with an "embed" axis is split.
  assert sharded < replicated / 8 * 1.25, (name, sharded / replicated)
