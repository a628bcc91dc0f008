"""Both contrastive losses against plain numpy references, also when the batch
is sharded over 8 devices (the loss must see the global batch)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.special import log_softmax

from multimodal.tasks import contrastive_losses as losses

pytestmark = pytest.mark.unit


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_softmax_loss(zimg, ztxt, scale):
  logits = min(scale, 100.0) * zimg @ ztxt.T
  n = len(logits)
  i2t = -log_softmax(logits, axis=1)[np.arange(n), np.arange(n)].mean()
  t2i = -log_softmax(logits, axis=0)[np.arange(n), np.arange(n)].mean()
  return (i2t + t2i) / 2


def numpy_sigmoid_loss(zimg, ztxt, scale, bias):
  logits = scale * zimg @ ztxt.T + bias
  labels = 2 * np.eye(len(logits)) - 1
  # log sigmoid(x) = -log(1 + exp(-x)), computed stably.
  return np.sum(np.logaddexp(0, -labels * logits)) / len(logits)


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  return (_unit(rng.normal(size=(16, 8))).astype(np.float32),
          _unit(rng.normal(size=(16, 8))).astype(np.float32))


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 250.0])
def test_softmax_loss_matches_numpy(embeddings, scale):
  zimg, ztxt = embeddings
  loss, logits = losses.softmax_contrastive_loss(zimg, ztxt, scale)
  np.testing.assert_allclose(loss, numpy_softmax_loss(zimg, ztxt, scale), rtol=1e-5)
  # Above 100 the scale is clamped: 250 and 100 give the same logits.
  assert np.abs(logits).max() <= 100.0 + 1e-4


def test_sigmoid_loss_matches_numpy(embeddings):
  zimg, ztxt = embeddings
  loss, _ = losses.sigmoid_contrastive_loss(zimg, ztxt, 10.0, -10.0)
  np.testing.assert_allclose(loss, numpy_sigmoid_loss(zimg, ztxt, 10.0, -10.0),
                             rtol=1e-5)


def test_losses_see_the_global_batch_when_sharded(embeddings):
  zimg, ztxt = embeddings
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = NamedSharding(mesh, P("data"))
  zimg_s, ztxt_s = jax.device_put(zimg, shard), jax.device_put(ztxt, shard)
  softmax = jax.jit(lambda a, b: losses.softmax_contrastive_loss(a, b, 5.0)[0])
  sigmoid = jax.jit(lambda a, b: losses.sigmoid_contrastive_loss(a, b, 10.0, -10.0)[0])
  np.testing.assert_allclose(softmax(zimg_s, ztxt_s),
                             numpy_softmax_loss(zimg, ztxt, 5.0), rtol=1e-5)
  np.testing.assert_allclose(sigmoid(zimg_s, ztxt_s),
                             numpy_sigmoid_loss(zimg, ztxt, 10.0, -10.0), rtol=1e-5)


def test_softmax_loss_is_low_for_matched_pairs():
  z = np.eye(8, dtype=np.float32)
  loss, _ = losses.softmax_contrastive_loss(z, z, 100.0)
  assert float(loss) < 1e-6
  shuffled, _ = losses.softmax_contrastive_loss(z, np.roll(z, 1, axis=0), 100.0)
  assert float(shuffled) > 50
