"""Scale-out invariants, for every family (CLIP, SigLIP, DiT, the VLM, the
ViT classifier): one train step gives the same loss, gradients and updated
parameters on one device and on the mesh data=2 x fsdp=2 x tensor=2 (pure
data parallelism, data=8, is every other test's default mesh); gradient
accumulation over microbatches equals the
large-batch step; every rematerialisation policy leaves the gradients
unchanged; bf16 compute keeps f32 master weights; and FSDP divides the
per-device bytes of parameters plus optimizer state by the fsdp size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_WORLD, tiny_clip_config
from multimodal.config import config_lib
from multimodal.data import pipeline
from multimodal.models import layers
from multimodal.parallel import sharding
from multimodal.tasks import classify, clip, dit, vlm
from multimodal.train import trainer

pytestmark = pytest.mark.unit

FAMILIES = ("clip", "siglip", "dit", "vlm", "classifier")
# One mesh with every axis: its step runs each sharding rule (batch over
# data and fsdp, parameters over fsdp and tensor) that fsdp=8 alone would run
# on one axis, so a step on fsdp=8 checks nothing more; fsdp=8 itself stays
# in test_fsdp_divides_parameter_and_optimizer_bytes (the per-device bytes),
# and every mesh of tests/test_losses_ring.py runs the sharded losses.
MESHES = {
    "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}
BATCH = 32


def family_config(name, data_dir, clip_workdir):
  if name in ("clip", "siglip"):
    return tiny_clip_config(data_dir, "loss=sigmoid" if name == "siglip" else "")
  specs = {
      "dit": "configs/dit_shapes.py:variant=mu/8,steps=10,res=32,batch=32",
      "vlm": "configs/vlm_shapes.py:stage=tune,steps=10,res=32,batch=32,vision_layer=-1",
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


# Each family's tests run on one pytest-xdist worker (--dist loadgroup), so
# the fixture below builds its task and reference step once, not on both.
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.xdist_group(f"scale_{name}")) for name in FAMILIES])
def family(request, data_dir, clip_workdir):
  """(name, task, config, one local batch, the single-device reference step)."""
  config = family_config(request.param, data_dir, clip_workdir)
  with config.unlocked():
    # One step that shows the gradients: AdamW's first update is
    # lr * g / (|g| + eps), so with lr = eps = 1 it is about g itself, and
    # comparing updated parameters compares gradients (with a tiny eps it is
    # about lr * sign(g), which would hide all but sign errors).
    config.schedule.warmup_steps = 0
    config.lr = 1.0
    config.adam_eps = 1.0
  task = make_task(config)
  ds = task.train_dataset(local_batch_size=BATCH, process_index=0,
                          process_count=1)
  batch = next(ds.as_numpy_iterator())
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  return request.param, task, config, batch, one_step(task, config, single, batch)


def one_step(task, config, mesh, local_batch, **step_options):
  """(loss, params before, params after one train step) on `mesh`, on host."""
  with sharding.mesh_context(mesh):
    init_fn, shardings, tx, schedule = trainer.create_train_state(task, config, mesh, 10)
    step = trainer.make_train_step(task, config, tx, schedule, shardings, mesh,
                                   **step_options)
    state = init_fn()
    before = jax.device_get(state["params"])
    state, metrics = step(
        state, pipeline.to_global_arrays(local_batch, sharding.batch_sharding(mesh)))
    return float(metrics["loss"]), before, jax.device_get(state["params"])


def assert_same_step(got, want):
  (loss, _, params), (want_loss, before, want_params) = got, want
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  # The updates (about the gradients, see `family`) agree to float tolerance,
  # relative to the largest one.
  updates = jax.tree.map(lambda a, b: a - b, want_params, before)
  scale = max(np.abs(u).max() for u in jax.tree.leaves(updates))
  assert scale > 1e-3  # The step really moved the parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=0),
               params, want_params)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_a_step_is_the_same_on_every_mesh(family, mesh_name):
  _, task, config, batch, reference = family
  config = config.copy_and_resolve_references()
  config.mesh = MESHES[mesh_name]
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.devices.size == 8
  assert_same_step(one_step(task, config, mesh, batch), reference)


def test_gradient_accumulation_equals_the_large_batch_step(family):
  """4 microbatches of 8 on data=2 x fsdp=2 x tensor=2 (2 examples per
  device each) against the batch of 32 at once on one device."""
  name, task, config, batch, reference = family
  if name == "classifier":
    pytest.skip("the generic accumulation, as the VLM's")
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 4
  config.mesh = MESHES["data=2,fsdp=2,tensor=2"]
  assert_same_step(one_step(task, config, sharding.make_mesh(config.mesh), batch),
                   reference)


def test_unrolled_accumulation_equals_the_large_batch_step(family):
  """config.grad_accum_unroll writes the microbatches out instead of looping
  over them (the bench's DiT and CLIP steps): the same update. DiT takes
  the generic path, CLIP its own (each tower once per microbatch, VJPs kept)."""
  name, task, config, batch, reference = family
  if name not in ("dit", "clip"):
    pytest.skip("one family per accumulation path")
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 2
  config.grad_accum_unroll = True
  config.mesh = MESHES["data=2,fsdp=2,tensor=2"]
  assert_same_step(one_step(task, config, sharding.make_mesh(config.mesh), batch),
                   reference)


def test_frozen_towers_skip_their_backward_pass_and_the_step_is_unchanged(family):
  """The vision tower frozen (LiT): the step that does not differentiate it
  (optim.without_frozen_gradients) updates the rest as the step that did,
  and leaves it as is. CLIP in 4 microbatches, its own accumulation path;
  the generic path is tests/test_optim.py's, and the VLM's frozen stages
  are tests/test_vlm.py's."""
  name, task, config, batch, _ = family
  if name != "clip":
    pytest.skip("one family: CLIP has the accumulation path of its own")
  config = config.copy_and_resolve_references()
  config.freeze = "img/.*"
  config.grad_accum_steps = 4
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  now = one_step(task, config, single, batch)
  assert_same_step(now, one_step(task, config, single, batch, frozen_backward=True))
  _, before, after = now
  jax.tree.map(np.testing.assert_array_equal, after["img"], before["img"])


def test_microbatches_must_span_the_data_parallel_devices(family, tmp_path):
  _, task, config, _, _ = family
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 8  # 32 / 8 = 4 examples per microbatch, 8 devices.
  config.mesh = {"data": 8}
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=8"):
    trainer.train(task, config, str(tmp_path))


# SigLIP's towers are CLIP's and the classifier's ViT is CLIP's image tower:
# the per-model checks below run once for each distinct model (every remat
# policy on the VLM, whose ViT and decoder blocks cover CLIP's kinds too).
SAME_MODEL_AS_CLIP = ("siglip", "classifier")


def skip_repeated_model(name):
  if name in SAME_MODEL_AS_CLIP:
    pytest.skip("the same transformer blocks as CLIP's")


@pytest.mark.parametrize("policy", sorted(set(layers.REMAT_POLICIES) - {"none"}))
def test_remat_policies_leave_the_step_unchanged(family, policy):
  name, _, config, batch, reference = family
  if name != "vlm":
    pytest.skip("every policy runs on the VLM's ViT and decoder blocks")
  config = config.copy_and_resolve_references()
  config.remat = policy
  task = make_task(config)
  jaxpr = str(jax.make_jaxpr(lambda p, b: task.loss_and_grads(
      p, task.random_draws(b, jax.random.key(0)), jax.random.key(0), 1))(
          sharding.strip_boxes(jax.eval_shape(task.init, jax.random.key(0))),
          jax.tree.map(jnp.asarray, batch)))
  assert "remat" in jaxpr or "checkpoint" in jaxpr  # The policy is really applied.
  single = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  assert_same_step(one_step(task, config, single, batch), reference)


def test_bf16_compute_keeps_f32_master_weights(family):
  name, _, config, batch, reference = family
  if name != "clip":
    pytest.skip("one family suffices: compute_dtype reaches every model the same way")
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
  skip_repeated_model(name)

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


def test_microbatch_count_for_a_size():
  from multimodal.train import accumulate
  assert accumulate.count_for_size(128, 32) == 4
  assert accumulate.count_for_size(128, 0) == 1  # 0: the whole batch.
  assert accumulate.count_for_size(6, 32) == 1
  assert accumulate.count_for_size(96, 40) == 3  # Parts of 32: 96 / 2 = 48 is too many.
  assert accumulate.count_for_size(14, 4) == 7  # The fewest even parts: 7 of 2 rows.
