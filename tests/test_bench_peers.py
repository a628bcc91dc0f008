"""experiments/bench_peers.py: each PyTorch peer builds at a tiny shape and
does its unit of work (twice). No timing is asserted."""
import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from experiments import bench_peers  # noqa: E402


def _snapshot(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_trains(step):
  before = _snapshot(step.model)
  losses = [step(), step()]
  assert all(isinstance(x, float) and np.isfinite(x) for x in losses), losses
  after = step.model.state_dict()
  changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
  assert changed, "no parameter changed after two steps"
  # Every trainable parameter got a gradient and moved (none were left out).
  trainable = [n for n, p in step.model.named_parameters() if p.requires_grad]
  assert len(changed) >= len(trainable) * 0.9, (len(changed), len(trainable))


def test_available_and_versions():
  assert bench_peers.available()
  version = bench_peers.torch_version()
  assert "torch" in version and "transformers" in version and "diffusers" in version


def test_clip_embed_images():
  embed = bench_peers.clip_embed_images(image_size=16, patch_size=8, width=32, depth=1,
                                        num_heads=2, mlp_dim=64, out_dim=16, batch=4)
  first, second = embed(), embed()
  assert first.shape == (4, 16) and np.isfinite(first).all()
  np.testing.assert_array_equal(first, second)  # Eval mode: deterministic.


def test_clip_train_step():
  step = bench_peers.clip_train_step(image_size=16, patch_size=8, width=32, depth=1,
                                     num_heads=2, mlp_dim=64, text_len=8, vocab_size=50,
                                     out_dim=16, batch=4)
  _assert_trains(step)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_train_step(learn_sigma):
  step = bench_peers.dit_train_step(image_size=8, patch_size=2, in_channels=3, width=32,
                                    depth=1, num_heads=2, num_classes=5, batch=4,
                                    learn_sigma=learn_sigma)
  assert step.model.config.out_channels == (6 if learn_sigma else 3)
  _assert_trains(step)


def test_dit_train_step_keeps_a_moving_average():
  step = bench_peers.dit_train_step(image_size=8, patch_size=2, in_channels=3, width=32,
                                    depth=1, num_heads=2, num_classes=5, batch=4,
                                    ema_decay=0.999)
  init = [p.detach().clone() for p in step.model.parameters()]
  _assert_trains(step)
  # After 2 steps the warm-up decay is (1 + 1) / (10 + 1): the average sits
  # between the initial and the current weights, equal to neither.
  shadow, now = step.ema.shadow_params, list(step.model.parameters())
  moved = [not torch.equal(s, p) and not torch.equal(s, i) for s, p, i in zip(shadow, now, init)
           if not torch.equal(p, i)]
  assert moved and all(moved)


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
def test_dit_sample_loop(cfg_scale):
  sample = bench_peers.dit_sample_loop(image_size=8, patch_size=2, in_channels=3, width=32,
                                       depth=1, num_heads=2, num_classes=5, batch=2, steps=3,
                                       cfg_scale=cfg_scale)
  first, second = sample(), sample()
  for out in (first, second):
    assert out.shape == (2, 3, 8, 8)
    assert np.isfinite(out).all()
  np.testing.assert_array_equal(first, second)  # Fixed inputs, deterministic DDIM.
  assert len(sample.scheduler.timesteps) == 3


def test_llama_generate():
  prompt = np.random.default_rng(0).integers(3, 64, (2, 5)).astype(np.int32)
  generate = bench_peers.llama_generate(width=32, mlp_dim=64, depth=1, num_heads=4,
                                        num_kv_heads=2, head_dim=8, vocab=64, prompt=prompt)
  for n in (3, 6):
    out = generate(n)
    assert out.shape == (2, n)
    assert ((out >= 0) & (out < 64)).all()
