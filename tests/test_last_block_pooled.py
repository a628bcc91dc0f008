"""`last_block_pooled_only`: a tower's last block computes only the token its
pooling reads. The pooled output and every gradient equal the full tower's
(the same parameters); the towers that read every token turn it off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal.models import text, vit, vlm

pytestmark = pytest.mark.unit

TOWER = dict(width=16, depth=2, mlp_dim=32, num_heads=2)


def out_and_grads(module, params, inputs):
  """The tower's output and the gradient of a loss that mixes its features."""
  weights = jax.random.normal(jax.random.key(1), module.apply(params, inputs)[0].shape)
  loss = lambda p: jnp.sum(module.apply(p, inputs)[0] * weights)
  return module.apply(params, inputs)[0], jax.grad(loss)(params)


def assert_same_tower(full, pooled, inputs):
  params = full.init(jax.random.key(0), inputs)
  out, grads = out_and_grads(full, params, inputs)
  out_pooled, grads_pooled = out_and_grads(pooled, params, inputs)
  np.testing.assert_allclose(out_pooled, out, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_pooled, grads)


def test_vit_cls_token_alone_in_the_last_block():
  images = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  kwargs = dict(TOWER, patch_size=(4, 4), pool_type="tok", num_classes=8)
  full, pooled = vit.ViT(**kwargs), vit.ViT(**kwargs, last_block_pooled_only=True)
  assert_same_tower(full, pooled, images)
  params = full.init(jax.random.key(0), images)
  _, aux = pooled.apply(params, images)
  # No tokens after the last block to hand out: the taps say so by absence.
  assert "encoded" not in aux and sorted(aux["blocks"]) == ["block00"]
  np.testing.assert_allclose(aux["blocks"]["block00"],
                             full.apply(params, images)[1]["blocks"]["block00"], rtol=1e-6)


@pytest.mark.parametrize("causal, pool, pad_id", [
    (True, "eos", 0),      # CLIP: causal, EOS at a different place in each row.
    (False, "last", 0),    # A padding mask only: one row for every query.
    (True, "argmax", None),
])
def test_text_pooled_position_alone_in_the_last_block(causal, pool, pad_id):
  tokens = jnp.array([[5, 9, 7, 1, 0, 0, 0],    # EOS (id 1) at 3, then pads.
                      [4, 1, 0, 0, 0, 0, 0],
                      [8, 6, 5, 4, 3, 7, 1]])
  kwargs = dict(TOWER, vocab_size=12, causal=causal, pool=pool, pad_id=pad_id, eos_id=1,
                num_classes=8)
  full = text.TextTransformer(**kwargs)
  pooled = text.TextTransformer(**kwargs, last_block_pooled_only=True)
  assert_same_tower(full, pooled, tokens)


def test_a_pool_over_every_token_is_refused():
  with pytest.raises(ValueError, match="needs pool_type='tok'"):
    vit.ViT(**TOWER, patch_size=(4, 4), pool_type="gap",
            last_block_pooled_only=True).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="not 'gap'"):
    text.TextTransformer(**TOWER, vocab_size=12, pool="gap", last_block_pooled_only=True
                         ).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_a_vlm_reads_every_token_of_a_tower_configured_pooled():
  """A VLM's image tower comes from a CLIP run's config, which may set the
  flag: the VLM turns it off, so the projector still sees all 16 patches."""
  image = dict(TOWER, patch_size=(4, 4), pool_type="tok", last_block_pooled_only=True)
  model = vlm.VisionLanguageModel(image=image, lm=dict(vocab_size=20, variant="mu"))
  images = jnp.zeros((2, 16, 16, 3))
  tokens = model.init_with_output(jax.random.key(0), images,
                                  method=vlm.VisionLanguageModel.embed_image)[0]
  assert tokens.shape[:2] == (2, 16)
