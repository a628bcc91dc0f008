"""Behavioural tests for multimodal.models.dit (the DiT denoiser)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal.parallel import sharding
from conftest import assert_logically_partitioned
from multimodal.models import dit, layers

pytestmark = pytest.mark.unit

KEY = jax.random.PRNGKey(0)
B = 2
X = jnp.asarray(np.random.RandomState(0).randn(B, 8, 8, 4), jnp.float32)
T = jnp.asarray([3, 700], jnp.int32)
Y = jnp.asarray([1, 7], jnp.int32)
NUM_CLASSES = 10
TXT = jnp.asarray(np.random.RandomState(1).randn(B, 12), jnp.float32)
TOKS = jnp.asarray(np.random.RandomState(2).randn(B, 5, 8), jnp.float32)
TOK_MASK = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
# Every conditioning path on: labels, pooled text, cross-attention on tokens.
FULL = dict(variant="mu/2", num_classes=NUM_CLASSES, text_dim=12, cross_attention=True,
            text_token_dim=8)


def n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def fake_init(model, *args, seed=0, **kwargs):
  """Random N(0, 0.2) variables with the real tree and boxes, via eval_shape.

  Behaviour tests (conditioning, masking) need the zero-init adaLN layers
  perturbed, or the output would not depend on anything.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


def fwd(model, **static):
  """Jitted apply (one compile beats eager per-op compiles on CPU)."""
  return jax.jit(lambda v, *a, **kw: model.apply(v, *a, **static, **kw))


# ------------------------------------------------------------------ numpy refs
# Transcribed from facebookresearch/DiT models.py (itself from MAE/GLIDE).


def np_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_get_2d_sincos_pos_embed(embed_dim, grid_size):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # here w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb_h = np_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = np_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def np_timestep_embedding(t, dim, max_period=10000, shift=0.0):
  """DiT's TimestepEmbedder.timestep_embedding, in float64 (shift=1 is
  diffusers' downscale_freq_shift=1 variant)."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - shift))
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  if dim % 2:
    emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
  return emb


def dit_torch_param_count(width, depth, patch, in_ch=4, num_classes=1000, input_size=32,
                          learn_sigma=True, freq=256):
  """Parameters of the PyTorch DiT, INCLUDING its frozen pos_embed."""
  out_ch = 2 * in_ch if learn_sigma else in_ch
  block = ((width * 3 * width + 3 * width) + (width * width + width)      # attn qkv, proj
           + (width * 4 * width + 4 * width) + (4 * width * width + width)  # mlp
           + (width * 6 * width + 6 * width))                               # adaLN
  num_patches = (input_size // patch)**2
  return (depth * block
          + patch * patch * in_ch * width + width                             # x_embedder
          + freq * width + width + width * width + width                      # t_embedder
          + (num_classes + 1) * width                                         # y_embedder
          + width * 2 * width + 2 * width + width * patch * patch * out_ch + patch * patch * out_ch
          + num_patches * width)                                              # pos_embed


# ------------------------------------------------------------------ variants


def test_decode_variant():
  assert dit.decode_variant("XL/2") == dict(width=1152, depth=28, num_heads=16, patch_size=(2, 2))
  assert dit.decode_variant("S/8")["patch_size"] == (8, 8)
  assert dit.decode_variant("B") == dict(width=768, depth=12, num_heads=12)
  assert dit.decode_variant("L/4x2")["patch_size"] == (4, 2)
  with pytest.raises(ValueError, match="valid names"):
    dit.decode_variant("XXL/2")


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("variant,hw", [("mu/2", (8, 8)), ("mu/4", (16, 8)), ("mu/8", (16, 16)),
                                        ("mu/4x2", (8, 8))])
def test_output_shape(learn_sigma, variant, hw):
  model = dit.DiT(variant=variant, num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
  x = jnp.zeros((B, *hw, 4))
  variables = jax.eval_shape(model.init, KEY, x, T, Y)
  out = jax.eval_shape(model.apply, variables, x, T, Y)
  assert out.shape == (B, *hw, 8 if learn_sigma else 4)
  assert out.dtype == jnp.float32


def test_real_forward_shape_and_bf16_compute():
  model = dit.DiT(variant="mu/4", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
  variables = fake_init(model, X, T, Y)
  out = fwd(model)(variables, X, T, Y)
  assert out.shape == (B, 8, 8, 8) and out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  params = nn.unbox(variables["params"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_patch_must_divide_input():
  model = dit.DiT(variant="mu/4", num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="multiple of the patch"):
    jax.eval_shape(model.init, KEY, jnp.zeros((1, 6, 8, 4)), T[:1])


def test_unpatchify_is_dit_channel_order():
  """The final linear's output (B, h*w, ph*pw*C) is read as (ph, pw, C) per
  token, like DiT's unpatchify (einsum nhwpqc->nchpwq)."""
  model = dit.DiT(variant="mu/2", num_classes=NUM_CLASSES, learn_sigma=False)
  variables = fake_init(model, X, T, Y)
  out, inter = jax.jit(lambda v: model.apply(v, X, T, Y, capture_intermediates=True))(variables)
  tokens = np.asarray(inter["intermediates"]["final_layer"]["__call__"][0])  # (B, 16, 16)
  out = np.asarray(out)
  n, h, w, p, c = B, 4, 4, 2, 4
  ref = np.einsum("nhwpqc->nchpwq", tokens.reshape(n, h, w, p, p, c)).reshape(n, c, h * p, w * p)
  np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ adaLN-Zero


@pytest.fixture(scope="module")
def real_full():
  """The real initialisation of the fully conditioned mu model."""
  model = dit.DiT(**FULL)
  kw = dict(text_emb=TXT, text_tokens=TOKS, text_mask=TOK_MASK)
  variables = jax.jit(lambda k: model.init(k, X, T, Y, **kw))(KEY)
  return model, variables, kw


def test_output_is_exactly_zero_at_init(real_full):
  model, variables, kw = real_full
  out = fwd(model)(variables, X, T, Y, **kw)
  assert out.shape == (B, 8, 8, 8)
  assert np.all(np.asarray(out) == 0.0)
  p = nn.unbox(variables["params"])
  for name in ("adaLN_modulation", "linear"):
    for leaf in jax.tree.leaves(p["final_layer"][name]):
      assert np.all(np.asarray(leaf) == 0.0), name


def test_every_block_is_identity_at_init(real_full):
  model, variables, kw = real_full
  _, inter = jax.jit(lambda v: model.apply(v, X, T, Y, capture_intermediates=True, **kw))(
      variables)
  inter = inter["intermediates"]
  patches = inter["x_embedder"]["__call__"][0]  # (B, 4, 4, width)
  tokens = patches.reshape(B, 16, 64) + dit.posemb_sincos_2d(4, 4, 64)
  assert float(jnp.abs(tokens).max()) > 0.1  # Not vacuous.
  for i in range(2):
    block_out = inter[f"blocks_{i}"]["__call__"][0]
    np.testing.assert_allclose(block_out, tokens, rtol=0, atol=1e-6)
  for name in ("adaLN_modulation", "adaLN_modulation_cross"):
    for leaf in jax.tree.leaves(nn.unbox(variables["params"])["blocks_0"][name]):
      assert np.all(np.asarray(leaf) == 0.0), name


def test_block_identity_by_construction_and_gates_matter():
  """A standalone block, real init, random x / c / context: output == x
  exactly. Perturbing only its adaLN Dense layers breaks the identity, so the
  zero gates (and nothing else) are what make it one."""
  block = dit.DiTBlock(num_heads=2)
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(B, 6, 32), jnp.float32)
  c = jnp.asarray(rng.randn(B, 32), jnp.float32)
  ctx = jnp.asarray(rng.randn(B, 4, 32), jnp.float32)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  variables = block.init(KEY, x, c, ctx, mask)
  np.testing.assert_array_equal(block.apply(variables, x, c, ctx, mask), x)
  params = nn.unbox(variables["params"])
  for name in ("adaLN_modulation", "adaLN_modulation_cross"):
    perturbed = dict(params)
    perturbed[name] = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype),
                                   params[name])
    out = block.apply({"params": perturbed}, x, c, ctx, mask)
    assert float(jnp.abs(out - x).max()) > 1e-3, name


# ------------------------------------------------------------------ fixed embeddings


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_embedding_matches_dit(dim):
  # float32 (as in DiT) rounds t * f to ~|t| * 1e-7, so large t only agree
  # with the float64 reference to ~1e-4; small t pin the formula tightly.
  for t, atol in ((np.asarray([0, 1, 2.5, 17.5]), 2e-6), (np.asarray([250, 500, 999]), 3e-4)):
    for shift in (0.0, 1.0):
      np.testing.assert_allclose(
          dit.timestep_embedding(jnp.asarray(t, jnp.float32), dim, freq_shift=shift),
          np_timestep_embedding(t, dim, shift=shift), rtol=0, atol=atol)
  # The shift matters (it is the DiT vs diffusers difference).
  t = jnp.asarray([500.0])
  assert float(jnp.abs(dit.timestep_embedding(t, dim)
                       - dit.timestep_embedding(t, dim, freq_shift=1.0)).max()) > 0.1


def test_timestep_embedder_layers():
  emb = dit.TimestepEmbedder(width=16)
  t = jnp.asarray([5, 900])
  v = emb.init(KEY, t)
  p = nn.unbox(v["params"])
  assert p["linear_1"]["kernel"].shape == (256, 16)
  assert p["linear_2"]["kernel"].shape == (16, 16)
  f = np_timestep_embedding(np.asarray(t), 256)
  h = f @ np.asarray(p["linear_1"]["kernel"]) + np.asarray(p["linear_1"]["bias"])
  h = h / (1 + np.exp(-h))  # SiLU
  ref = h @ np.asarray(p["linear_2"]["kernel"]) + np.asarray(p["linear_2"]["bias"])
  np.testing.assert_allclose(emb.apply(v, t), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width,grid", [(64, 4), (384, 16), (1152, 16), (8, 3)])
def test_posemb_matches_dit_get_2d_sincos_pos_embed(width, grid):
  ref = np_get_2d_sincos_pos_embed(width, grid)
  ours = np.asarray(dit.posemb_sincos_2d(grid, grid, width))
  assert ours.shape == (1, grid * grid, width)
  np.testing.assert_allclose(ours[0], ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ label dropout


def _label_table(emb_vars):
  return np.asarray(nn.unbox(emb_vars["params"])["embedding_table"]["embedding"])


def test_label_embedder_dropout():
  labels = jnp.arange(6) % NUM_CLASSES
  drop_all = dit.LabelEmbedder(NUM_CLASSES, 16, dropout_prob=1.0)
  v = drop_all.init(KEY, labels)
  table = _label_table(v)
  assert table.shape == (NUM_CLASSES + 1, 16)
  null = table[NUM_CLASSES]
  out = drop_all.apply(v, labels, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(out, np.broadcast_to(null, out.shape))
  # Eval mode never drops, even at probability 1.
  np.testing.assert_array_equal(drop_all.apply(v, labels, train=False), table[np.asarray(labels)])
  # force_drop_ids drops exactly where == 1, in eval and in train without randomness.
  force = jnp.asarray([1, 0, 1, 0, 0, 1])
  no_drop = dit.LabelEmbedder(NUM_CLASSES, 16, dropout_prob=0.0)
  want = np.where(np.asarray(force)[:, None] == 1, null, table[np.asarray(labels)])
  np.testing.assert_array_equal(no_drop.apply(v, labels, force_drop_ids=force), want)
  np.testing.assert_array_equal(no_drop.apply(v, labels, train=True, force_drop_ids=force), want)
  # y = num_classes IS the null embedding (what a CFG sampler passes).
  np.testing.assert_array_equal(no_drop.apply(v, jnp.asarray([NUM_CLASSES])), null[None])


def test_label_dropout_rate_is_about_prob():
  emb = dit.LabelEmbedder(NUM_CLASSES, 4, dropout_prob=0.3)
  labels = jnp.zeros((4000,), jnp.int32)
  v = emb.init(KEY, labels[:1])
  out = emb.apply(v, labels, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
  frac = float(np.mean(np.all(np.asarray(out) == _label_table(v)[NUM_CLASSES], axis=-1)))
  assert 0.26 < frac < 0.34


@pytest.fixture(scope="module")
def fake_full():
  model = dit.DiT(**FULL)
  variables = fake_init(model, X, T, Y, text_emb=TXT, text_tokens=TOKS, text_mask=TOK_MASK)
  return model, variables


def test_model_label_dropout_train_eval_force(fake_full):
  model, variables = fake_full
  model = model.clone(class_dropout_prob=1.0)
  kw = dict(text_emb=TXT, text_tokens=TOKS, text_mask=TOK_MASK)
  apply = jax.jit(lambda v, y, train, force, rng: model.apply(
      v, X, T, y, train=train, force_drop_ids=force, rngs={"dropout": rng}, **kw),
      static_argnums=(2,))
  rng = jax.random.PRNGKey(9)
  null_y = jnp.full((B,), NUM_CLASSES)
  cond = apply(variables, Y, False, None, rng)
  # Train mode at p=1 drops every example's conditioning: identical to
  # passing no conditioning at all.
  uncond = jax.jit(lambda v: model.apply(v, X, T))(variables)
  np.testing.assert_allclose(apply(variables, Y, True, None, rng), uncond, atol=1e-5)
  # In eval nothing is dropped: output depends on the label.
  assert float(jnp.abs(cond - uncond).max()) > 1e-3
  assert float(jnp.abs(cond - apply(variables, null_y, False, None, rng)).max()) > 1e-3
  # force_drop_ids drops exactly the flagged examples, in eval mode.
  forced = apply(variables, Y, False, jnp.asarray([1, 0]), rng)
  np.testing.assert_allclose(forced[0], uncond[0], atol=1e-5)
  np.testing.assert_allclose(forced[1], cond[1], atol=1e-5)


def test_unconditional_model_and_argument_errors():
  model = dit.DiT(variant="mu/4", num_classes=None)
  variables = fake_init(model, X, T)
  assert set(variables["params"]) == {"x_embedder", "t_embedder", "blocks_0", "blocks_1",
                                      "final_layer"}
  out = fwd(model)(variables, X, T)
  assert out.shape == (B, 8, 8, 8)
  # A scalar t is broadcast over the batch.
  np.testing.assert_allclose(fwd(model)(variables, X, jnp.asarray(3.0)),
                             fwd(model)(variables, X, jnp.asarray([3.0, 3.0])), atol=1e-6)
  with pytest.raises(ValueError, match="num_classes is None"):
    model.apply(variables, X, T, Y)
  with pytest.raises(ValueError, match="text_dim=None"):
    model.apply(variables, X, T, text_emb=TXT)
  with pytest.raises(ValueError, match="cross_attention=False"):
    model.apply(variables, X, T, text_tokens=TOKS)


# ------------------------------------------------------------------ text conditioning


def test_pooled_text_conditioning(fake_full):
  model, variables = fake_full
  f = jax.jit(lambda v, txt, force: model.apply(v, X, T, Y, text_emb=txt, force_drop_ids=force,
                                                 text_tokens=TOKS, text_mask=TOK_MASK))
  base = f(variables, TXT, None)
  other = f(variables, TXT + 1.0, None)
  assert float(jnp.abs(base - other).max()) > 1e-3
  # Per-example: changing example 1's text leaves example 0's output alone.
  np.testing.assert_allclose(f(variables, TXT.at[1].add(1.0), None)[0], base[0], atol=1e-5)
  # No pooled text == the learned null text == what a dropped example sees.
  no_text = jax.jit(lambda v: model.apply(v, X, T, Y, text_tokens=TOKS, text_mask=TOK_MASK))(
      variables)
  assert float(jnp.abs(no_text - base).max()) > 1e-3


def test_pooled_text_without_labels_only_text_model():
  model = dit.DiT(variant="mu/4", num_classes=None, text_dim=12)
  variables = fake_init(model, X, T, text_emb=TXT)
  f = fwd(model)
  a, b = f(variables, X, T, text_emb=TXT), f(variables, X, T, text_emb=-TXT)
  assert float(jnp.abs(a - b).max()) > 1e-3
  # Params exist even when init never saw text, so apply with text still works.
  v2 = fake_init(model, X, T)
  assert jax.tree.map(jnp.shape, v2) == jax.tree.map(jnp.shape, variables)


def test_cross_attention_uses_tokens_and_respects_mask(fake_full):
  model, variables = fake_full
  f = jax.jit(lambda v, toks, mask: model.apply(v, X, T, Y, text_emb=TXT, text_tokens=toks,
                                                 text_mask=mask))
  base = f(variables, TOKS, TOK_MASK)
  # Changing a masked-out token (example 0, position 4) changes nothing ...
  np.testing.assert_allclose(f(variables, TOKS.at[0, 4].add(5.0), TOK_MASK), base, atol=1e-5)
  # ... changing a valid one does.
  changed = f(variables, TOKS.at[0, 1].add(5.0), TOK_MASK)
  assert float(jnp.abs(changed[0] - base[0]).max()) > 1e-3
  np.testing.assert_allclose(changed[1], base[1], atol=1e-5)
  # No tokens == every token masked (only the null token is attended).
  none = jax.jit(lambda v: model.apply(v, X, T, Y, text_emb=TXT))(variables)
  np.testing.assert_allclose(f(variables, TOKS, jnp.zeros_like(TOK_MASK)), none, atol=1e-5)
  assert float(jnp.abs(none - base).max()) > 1e-3


def test_cross_attention_needs_token_dim():
  with pytest.raises(ValueError, match="text_token_dim"):
    jax.eval_shape(dit.DiT(variant="mu/4", cross_attention=True).init, KEY, X, T, Y)


# ------------------------------------------------------------------ param counts

PAPER_M = {"S/2": 33.0, "B/2": 130.3, "L/2": 458.0, "XL/2": 675.1}


@pytest.mark.parametrize("variant", list(PAPER_M))
def test_param_counts_match_dit(variant):
  model = dit.DiT(variant=variant, num_classes=1000, learn_sigma=True)
  shapes = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))
  ours = n_params(shapes["params"])
  cfg = dit.decode_variant(variant)
  pos_embed = (32 // cfg["patch_size"][0])**2 * cfg["width"]
  # Exactly the PyTorch DiT's parameters minus its frozen pos_embed buffer ...
  assert ours + pos_embed == dit_torch_param_count(cfg["width"], cfg["depth"],
                                                   cfg["patch_size"][0])
  # ... which is within 0.5% of the paper's counts either way.
  assert abs(ours / 1e6 - PAPER_M[variant]) / PAPER_M[variant] < 0.005
  assert abs((ours + pos_embed) / 1e6 - PAPER_M[variant]) / PAPER_M[variant] < 0.005


# ------------------------------------------------------------------ logical axes


def _param_trees():
  yield "full", dit.DiT(**FULL), (X, T, Y), dict(text_emb=TXT, text_tokens=TOKS,
                                                 text_mask=TOK_MASK)
  yield "labels_only", dit.DiT(variant="mu/4", num_classes=NUM_CLASSES), (X, T, Y), {}
  yield "unconditional", dit.DiT(variant="mu/8", num_classes=None, learn_sigma=False), (X, T), {}


@pytest.mark.parametrize("name,model,args,kwargs", list(_param_trees()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_param_is_logically_partitioned(name, model, args, kwargs):
  assert_logically_partitioned(
      jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))["params"])


def test_block_param_paths():
  """The tree an importer (DiT / diffusers DiTTransformer2DModel) maps onto."""
  params = jax.eval_shape(lambda: dit.DiT(**FULL).init(
      KEY, X, T, Y, text_emb=TXT, text_tokens=TOKS, text_mask=TOK_MASK))["params"]
  shapes = {jax.tree_util.keystr(p): v.value.shape for p, v in
            jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(
                x, nn.Partitioned))}
  block = {k[len("['blocks_0']"):]: v for k, v in shapes.items() if k.startswith("['blocks_0']")}
  assert block == {
      "['adaLN_modulation']['kernel']": (64, 384), "['adaLN_modulation']['bias']": (384,),
      "['attn']['query_kernel']": (64, 2, 32), "['attn']['query_bias']": (2, 32),
      "['attn']['key_kernel']": (64, 2, 32), "['attn']['key_bias']": (2, 32),
      "['attn']['value_kernel']": (64, 2, 32), "['attn']['value_bias']": (2, 32),
      "['attn']['out_kernel']": (2, 32, 64), "['attn']['out_bias']": (64,),
      "['mlp']['Dense_0']['kernel']": (64, 256), "['mlp']['Dense_0']['bias']": (256,),
      "['mlp']['Dense_1']['kernel']": (256, 64), "['mlp']['Dense_1']['bias']": (64,),
      "['adaLN_modulation_cross']['kernel']": (64, 192),
      "['adaLN_modulation_cross']['bias']": (192,),
      "['cross_attn']['query_kernel']": (64, 2, 32), "['cross_attn']['query_bias']": (2, 32),
      "['cross_attn']['key_kernel']": (64, 2, 32), "['cross_attn']['key_bias']": (2, 32),
      "['cross_attn']['value_kernel']": (64, 2, 32), "['cross_attn']['value_bias']": (2, 32),
      "['cross_attn']['out_kernel']": (2, 32, 64), "['cross_attn']['out_bias']": (64,),
  }
  assert shapes["['x_embedder']['kernel']"] == (2, 2, 4, 64)
  assert shapes["['y_embedder']['embedding_table']['embedding']"] == (NUM_CLASSES + 1, 64)
  assert shapes["['t_embedder']['linear_1']['kernel']"] == (256, 64)
  assert shapes["['final_layer']['adaLN_modulation']['kernel']"] == (64, 128)
  assert shapes["['final_layer']['linear']['kernel']"] == (64, 2 * 2 * 8)
  assert shapes["['text_embedder']['kernel']"] == (12, 64)
  assert shapes["['text_tokens_embedder']['null_token']"] == (1, 1, 64)


def test_xl_shards_on_the_project_mesh_rules():
  """XL/2's params map through sharding.LOGICAL_AXIS_RULES onto an 8-device
  (data 2, fsdp 2, tensor 2) mesh with every sharded dim divisible."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = dit.DiT(variant="XL/2", num_classes=1000)
  params = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
  shardings = sharding.logical_shardings(params, mesh)
  values = sharding.strip_boxes(params)
  for (path, s), v in zip(jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(values)):
    for dim, axes in zip(v.shape, tuple(s.spec) + (None,) * (v.ndim - len(s.spec))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      assert dim % size == 0, (jax.tree_util.keystr(path), v.shape, s.spec)


def test_runs_under_mesh_with_logical_rules(fake_full):
  model, variables = fake_full
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           sharding.MESH_AXES)
  kw = dict(text_emb=TXT, text_tokens=TOKS, text_mask=TOK_MASK)
  assert "sharding_constraint" not in str(jax.make_jaxpr(
      lambda v: model.apply(v, X, T, Y, **kw))(variables))
  with sharding.mesh_context(mesh):
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, X, T, Y, **kw))(variables))
  assert "sharding_constraint" in jaxpr


def test_remat_matches_plain():
  model = dit.DiT(variant="mu/4", num_classes=NUM_CLASSES)
  variables = fake_init(model, X, T, Y)
  loss = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, X, T, Y)**2)))
  g1 = loss(model)(variables)
  g2 = loss(model.clone(remat=True))(variables)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
