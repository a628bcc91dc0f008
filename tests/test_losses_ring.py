"""The ring (chunked) SigLIP loss: the dense loss's value and gradients on every
mesh layout, without the global [B, B] logits in the compiled program, and the
same loss when a CLIP task is configured with loss_impl="ring"."""
import copy
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_clip_config
from multimodal.config import config_lib
from multimodal.data import pipeline
from multimodal.parallel import sharding
from multimodal.tasks import contrastive_losses as losses

pytestmark = pytest.mark.unit

SCALE, BIAS = 10.0, -10.0

# (mesh config, how many devices): every batch axis split, only one of them,
# a tensor axis beside them, and a single device (a ring of one).
MESHES = [
    ({"data": 8}, 8),
    ({"fsdp": 8}, 8),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
    ({"data": 2, "tensor": 4}, 8),
    ({"data": 1}, 1),
]


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _embeddings(batch, dim, seed=0):
  """Texts near their images, so that positives and accuracy mean something."""
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(batch, dim))
  return _unit(zimg), _unit(zimg + 0.7 * rng.normal(size=(batch, dim)))


def _mesh(mesh_config, num_devices):
  return sharding.make_mesh(mesh_config, devices=jax.devices()[:num_devices])


def _value_and_grads(loss):
  """jit(value and gradients w.r.t. zimg, ztxt, scale and bias) of `loss`."""
  return jax.jit(jax.value_and_grad(
      lambda zimg, ztxt, scale, bias: loss(zimg, ztxt, scale, bias)[0],
      argnums=(0, 1, 2, 3)))


def _assert_grads_close(actual, expected):
  for a, e in zip(actual, expected):
    a, e = np.asarray(a), np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * np.abs(e).max())


@pytest.mark.parametrize(
    "mesh_config,num_devices", MESHES,
    ids=["data8", "fsdp8", "data2_fsdp2_tensor2", "data2_tensor4", "one_device"])
def test_ring_equals_dense_value_and_gradients(mesh_config, num_devices):
  zimg, ztxt = _embeddings(32, 8)
  mesh = _mesh(mesh_config, num_devices)
  with sharding.mesh_context(mesh):
    batch = sharding.batch_sharding(mesh)
    zimg_s, ztxt_s = jax.device_put(zimg, batch), jax.device_put(ztxt, batch)
    dense_loss, dense_grads = _value_and_grads(losses.sigmoid_contrastive_loss)(
        zimg_s, ztxt_s, SCALE, BIAS)
    ring_loss, ring_grads = _value_and_grads(losses.sigmoid_contrastive_loss_ring)(
        zimg_s, ztxt_s, SCALE, BIAS)
    _, rows = jax.jit(losses.sigmoid_contrastive_loss_ring)(
        zimg_s, ztxt_s, SCALE, BIAS)
  np.testing.assert_allclose(ring_loss, dense_loss, rtol=1e-5)
  _assert_grads_close(ring_grads, dense_grads)
  # And both against the unsharded loss, so neither can drift with the mesh.
  reference, logits = losses.sigmoid_contrastive_loss(zimg, ztxt, SCALE, BIAS)
  np.testing.assert_allclose(ring_loss, reference, rtol=1e-5)

  # The row stats stand in for the logits: the diagonal, the best negative,
  # and from them the argmax accuracy.
  logits = np.asarray(logits)
  off_diagonal = np.where(np.eye(len(logits), dtype=bool), -np.inf, logits)
  np.testing.assert_allclose(rows["positive_logits"], np.diag(logits), rtol=1e-5)
  np.testing.assert_allclose(rows["max_negative_logits"], off_diagonal.max(1),
                             rtol=1e-5)
  dense_accuracy = np.mean(logits.argmax(1) == np.arange(len(logits)))
  ring_accuracy = np.mean(rows["positive_logits"] > rows["max_negative_logits"])
  assert 0 < dense_accuracy < 1  # Neither trivial nor saturated.
  assert ring_accuracy == dense_accuracy


def test_ring_needs_a_mesh():
  zimg, ztxt = _embeddings(8, 4)
  with pytest.raises(ValueError, match="mesh_context"):
    losses.sigmoid_contrastive_loss_ring(zimg, ztxt, SCALE, BIAS)


def _shapes(hlo_text):
  """The dimensions of every f32 array in compiled HLO text."""
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"\bf32\[([0-9,]*)\]", hlo_text)]


def _global_logits_found(jitted, *args, batch):
  """Whether the program holds the global logits: a [B, B] array before
  partitioning, or on any device an array with a dimension of B (a row block
  of them, or the gathered texts they are built from)."""
  lowered = jitted.lower(*args)
  whole_program = f"tensor<{batch}x{batch}xf32>" in lowered.as_text()
  per_device = any(batch in dims for dims in _shapes(lowered.compile().as_text()))
  return whole_program, per_device


def test_ring_builds_no_global_logits():
  # B = 48 on 8 devices: 6 rows each, and D = 5, so 48 is no other dimension.
  batch, dim = 48, 5
  zimg, ztxt = _embeddings(batch, dim)
  mesh = _mesh({"data": 8}, 8)
  with sharding.mesh_context(mesh):
    shard = sharding.batch_sharding(mesh)
    args = (jax.device_put(zimg, shard), jax.device_put(ztxt, shard), SCALE, BIAS)
    # The training step's view: the loss and its gradients.
    dense = _global_logits_found(
        _value_and_grads(losses.sigmoid_contrastive_loss), *args, batch=batch)
    ring = _global_logits_found(
        _value_and_grads(losses.sigmoid_contrastive_loss_ring), *args, batch=batch)
    compiled = _value_and_grads(losses.sigmoid_contrastive_loss_ring).lower(
        *args).compile().as_text()
  assert dense == (True, True)  # The check can fail: it flags the dense loss.
  assert ring == (False, False)
  assert (6, 6) in _shapes(compiled)  # The per-device block it builds instead.
  assert "collective-permute" in compiled


def test_loss_impl_config_errors():
  from configs import clip_shapes
  from multimodal.tasks import clip
  config = clip_shapes.get_config()  # loss=softmax
  config.loss_impl = "ring"
  with pytest.raises(config_lib.ConfigError, match=r"config\.loss_impl='ring'.*sigmoid"):
    clip.loss_impl(config)
  config = clip_shapes.get_config("loss=sigmoid")
  config.loss_impl = "chunked"
  with pytest.raises(config_lib.ConfigError, match=r"config\.loss_impl='chunked'"):
    clip.loss_impl(config)
  config.loss_impl = "ring"
  assert clip.loss_impl(config) == "ring"


def test_clip_task_ring_loss_equals_dense(data_dir):
  from multimodal.tasks import clip
  ring_task = clip.ContrastiveTask(
      tiny_clip_config(data_dir, "loss=sigmoid", loss_impl="ring"))
  dense_task = copy.copy(ring_task)  # Same model and tokenizer.
  dense_task.config = ring_task.config.copy_and_resolve_references()
  dense_task.config.loss_impl = "dense"
  ds = ring_task.train_dataset(local_batch_size=32,
                               process_index=0, process_count=1)
  local_batch = next(ds.as_numpy_iterator())
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with sharding.mesh_context(mesh):
    # No optimizer state: the params alone, replicated (they are tiny).
    params = jax.jit(lambda rng: nn.unbox(ring_task.init(rng)))(jax.random.key(0))
    batch = pipeline.to_global_arrays(local_batch, sharding.batch_sharding(mesh))
    # One program for both, so the model is compiled once.
    step = jax.jit(lambda p, b: {
        name: jax.value_and_grad(
            lambda p: task.loss_fn(p, b, jax.random.key(0)), has_aux=True)(p)
        for name, task in (("dense", dense_task), ("ring", ring_task))})
    results = jax.device_get(step(params, batch))
  (dense_loss, dense_metrics), dense_grads = results["dense"]
  (ring_loss, ring_metrics), ring_grads = results["ring"]
  np.testing.assert_allclose(ring_loss, dense_loss, rtol=1e-5)
  assert ring_metrics.keys() == dense_metrics.keys()
  for key in dense_metrics:
    np.testing.assert_allclose(ring_metrics[key], dense_metrics[key], rtol=1e-5)
  # Relative to the largest gradient, as some are analytically ~0.
  scale = max(np.abs(g).max() for g in jax.tree.leaves(dense_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * scale),
               ring_grads, dense_grads)
