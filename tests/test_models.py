"""Behavioural tests for multimodal.models (ViT, TextTransformer, TwoTowers)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_logically_partitioned
from multimodal.models import layers
from multimodal.models.text import TextTransformer
from multimodal.models.two_towers import TwoTowers
from multimodal.models.vit import VARIANTS, ViT, decode_variant

pytestmark = pytest.mark.unit

KEY = jax.random.PRNGKey(0)
IMG = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3), jnp.float32)
MU_VIT = dict(variant="mu/4")  # 16x16 image -> 4x4 = 16 patches of width 64.
MU_TXT = dict(vocab_size=50, variant="mu")


def n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def toks(rows, length):
  """Right-pads lists of ids with pad_id=0 to `length`."""
  return jnp.asarray([r + [0] * (length - len(r)) for r in rows], jnp.int32)


def fake_init(model, *args, seed=0):
  """Random variables with the real tree/boxes/dtypes, built from eval_shape.

  Real init runs hundreds of un-jitted RNG ops, each compiled on first use;
  behaviour tests (masking, pooling, shapes) do not depend on init values, so
  this keeps the file fast. Tests about init values use the real init.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, KEY, *args)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


def fwd(model, method=None, train=False):
  """Jitted apply: one compile beats eager per-op compiles by ~10x on CPU."""
  return jax.jit(lambda v, *a, **kw: model.apply(v, *a, method=method, train=train, **kw))


# ---------------------------------------------------------------- param counts


@pytest.mark.parametrize("variant,expected", [
    ("B/16", 86_567_656), ("L/16", 304_326_632), ("S/16", 22_050_664)])
def test_vit_param_counts_match_published(variant, expected):
  model = ViT(num_classes=1000, variant=variant, pool_type="tok")
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)))
  assert n_params(shapes["params"]) == expected


def test_variant_overrides_explicit_fields():
  model = ViT(variant="mu", width=999, depth=7, patch_size=(8, 8))
  p = jax.eval_shape(model.init, KEY, jnp.zeros((1, 16, 16, 3)))["params"]
  assert p["embedding"]["kernel"].value.shape == (8, 8, 3, 64)  # width from variant,
  assert len([k for k in p["Transformer"] if k.startswith("encoderblock")]) == 2  # depth too.


# ---------------------------------------------------------------- logical axes


def _all_param_trees():
  yield "vit", ViT(num_classes=10, **MU_VIT, pool_type="map"), (IMG,)
  yield "vit_sincos", ViT(**MU_VIT, posemb="sincos2d", pool_type="tok"), (IMG,)
  yield "vit_conv_stem", ViT(**MU_VIT, stem="conv", pool_type="gap"), (IMG,)
  yield "text", TextTransformer(**MU_TXT, num_classes=8), (toks([[3, 4, 1]], 6),)
  yield "two_towers", TwoTowers(image=MU_VIT, text=MU_TXT, out_dim=8, bias_init=-10.0), (
      IMG, toks([[3, 4, 1]] * 2, 6))


@pytest.mark.parametrize("name,model,args", list(_all_param_trees()), ids=lambda v: (
    v if isinstance(v, str) else ""))
def test_every_param_is_logically_partitioned(name, model, args):
  assert_logically_partitioned(jax.eval_shape(model.init, KEY, *args)["params"])


def test_runs_under_mesh_with_logical_rules():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"), ("vocab", "tensor"), ("kv", None), ("length", None))
  model = TwoTowers(image=dict(MU_VIT, pool_type="map"), text=dict(MU_TXT, causal=True), out_dim=8)
  text = toks([[3, 4, 1], [5, 1]], 8)
  variables = fake_init(model, IMG, text)
  # Outside a mesh the activation constraints vanish; inside they are real.
  assert "sharding_constraint" not in str(jax.make_jaxpr(model.apply)(variables, IMG, text))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert "sharding_constraint" in str(jax.make_jaxpr(model.apply)(variables, IMG, text))
    zimg, ztxt, _ = fwd(model)(variables, IMG, text)
  assert zimg.shape == ztxt.shape == (2, 8)


# ---------------------------------------------------------------- ViT


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
@pytest.mark.parametrize("pool_type", ["tok", "gap", "map", "none"])
def test_vit_output_shapes(pool_type, posemb):
  model = ViT(**MU_VIT, pool_type=pool_type, posemb=posemb)
  variables = fake_init(model, IMG)
  out, aux = fwd(model)(variables, IMG)
  assert aux["encoded"].shape == (2, 16, 64)  # cls token stripped
  assert set(aux["blocks"]) == {"block00", "block01"}
  assert all(v.shape == (2, 16, 64) for v in aux["blocks"].values())
  expected = (2, 16, 64) if pool_type == "none" else (2, 64)
  assert out.shape == aux["pre_logits"].shape == expected
  p = variables["params"]
  assert ("cls" in p) == (pool_type == "tok")
  assert ("MAPHead_0" in p) == (pool_type == "map")
  assert ("pos_embedding" in p) == (posemb == "learn")
  if posemb == "learn":  # ViT/timm layout: the cls token has its own row.
    assert p["pos_embedding"].value.shape == (1, 16 + (pool_type == "tok"), 64)
  if pool_type == "gap":
    np.testing.assert_allclose(out, aux["encoded"].mean(1), atol=1e-5)
  if pool_type == "none":
    np.testing.assert_allclose(out, aux["encoded"], atol=1e-6)


def test_conv_stem_gives_the_patchify_token_grid():
  conv = ViT(**MU_VIT, stem="conv", pool_type="none")
  patch = ViT(**MU_VIT, pool_type="none")
  conv_out, _ = fwd(conv)(fake_init(conv, IMG), IMG)
  patch_out, _ = fwd(patch)(fake_init(patch, IMG), IMG)
  assert conv_out.shape == patch_out.shape == (2, 16, 64)
  stem = fake_init(conv, IMG)["params"]["conv_stem"]
  # Patch 4 = two stride-2 3x3 convolutions (channels doubling up to the
  # width), the 1x1 projection, and the linear patchify beside them.
  assert sorted(stem) == ["conv0", "conv1", "embedding", "norm0", "norm1",
                          "patch_embedding"]
  assert stem["conv0"]["kernel"].value.shape == (3, 3, 3, 32)
  assert stem["conv1"]["kernel"].value.shape == (3, 3, 32, 64)
  assert stem["patch_embedding"]["kernel"].value.shape == (4, 4, 3, 64)
  with pytest.raises(ValueError, match="power-of-two"):
    ViT(variant="mu/6", stem="conv").init(KEY, jnp.zeros((1, 12, 12, 3)))


def test_vit_real_init_and_classifier_head():
  # depth=1: real init compiles one RNG graph per param, so keep the tree small.
  model = ViT(num_classes=7, width=32, depth=1, num_heads=2, patch_size=(4, 4))
  variables = jax.jit(model.init)(KEY, IMG)
  logits, aux = fwd(model)(variables, IMG)
  assert logits.shape == (2, 7) and aux["pre_logits"].shape == (2, 32)
  np.testing.assert_array_equal(logits, 0.0)  # head_zeroinit=True
  assert np.isfinite(np.asarray(aux["pre_logits"])).all()
  assert np.abs(np.asarray(aux["pre_logits"])).max() > 0


def test_posemb_sincos_2d_matches_numpy_reference():
  h, w, width, temp = 3, 5, 16, 10_000.0
  q = width // 4
  ref = np.zeros((h * w, width))
  for y in range(h):
    for x in range(w):
      for i in range(q):
        f = temp ** (-i / (q - 1))
        row = y * w + x
        ref[row, i], ref[row, q + i] = math.sin(x * f), math.cos(x * f)
        ref[row, 2 * q + i], ref[row, 3 * q + i] = math.sin(y * f), math.cos(y * f)
  got = layers.posemb_sincos_2d(h, w, width, temp)
  assert got.shape == (1, h * w, width)
  np.testing.assert_allclose(got[0], ref, atol=1e-6)


def test_remat_matches_plain_and_dropout_needs_train():
  plain, remat = ViT(**MU_VIT, dropout=0.5), ViT(**MU_VIT, dropout=0.5, remat=True)
  variables = fake_init(plain, IMG)
  out_plain, _ = fwd(plain)(variables, IMG)
  out_remat, _ = fwd(remat)(variables, IMG)  # same param tree, same numbers
  np.testing.assert_allclose(out_plain, out_remat, atol=1e-5)
  out_train, _ = fwd(plain, train=True)(variables, IMG, rngs={"dropout": KEY})
  assert not np.allclose(out_plain, out_train)


def test_decode_variant():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                        patch_size=(16, 16))
  assert decode_variant("So400m/14")["patch_size"] == (14, 14)
  assert decode_variant("mu/16x8")["patch_size"] == (16, 8)
  assert "patch_size" not in decode_variant("S")
  assert decode_variant("S")["width"] == 384
  assert set(VARIANTS) >= {"Ti", "S", "M", "B", "L", "So400m", "H", "mu", "nano"}
  for bad in ["X/16", "B/", "b/16", "B16", "", "B/16/2"]:
    with pytest.raises(ValueError, match="valid names"):
      decode_variant(bad)


# ---------------------------------------------------------------- text


def test_text_causal_mask():
  a = toks([[5, 6, 7, 8, 9, 1]], 8)
  b = a.at[0, 4].set(3)  # change a later token
  for causal in (True, False):
    model = TextTransformer(**MU_TXT, causal=causal)
    variables, f = fake_init(model, a), fwd(model)
    ea = f(variables, a)[1]["encoded"]
    eb = f(variables, b)[1]["encoded"]
    if causal:
      np.testing.assert_allclose(ea[:, :4], eb[:, :4], atol=1e-6)
    else:
      assert not np.allclose(ea[:, :4], eb[:, :4], atol=1e-4)
    assert not np.allclose(ea[:, 4:], eb[:, 4:], atol=1e-4)


POOLS = ("eos", "last", "argmax", "first", "gap")


@functools.partial(jax.jit, static_argnames="causal")
def _pooled_by_type(variables, tokens, causal):
  # One compile for all pool types: XLA dedupes the five identical encoders.
  outs = {}
  for pool in POOLS:
    model = TextTransformer(**MU_TXT, causal=causal, max_len=16, pool=pool)
    outs[pool] = model.apply(variables, tokens)[1]
  return outs


@pytest.mark.parametrize("causal", [False, True])
def test_text_padding_does_not_change_pooled(causal):
  rows = [[5, 9, 7, 1], [8, 3, 1]]
  model = TextTransformer(**MU_TXT, causal=causal, max_len=16)
  variables = fake_init(model, toks(rows, 16))  # pooling adds no params
  short = _pooled_by_type(variables, toks(rows, 8), causal)
  long = _pooled_by_type(variables, toks(rows, 16), causal)
  for pool in POOLS:
    np.testing.assert_allclose(short[pool]["pooled"], long[pool]["pooled"], atol=1e-5,
                               err_msg=pool)


def test_text_pool_selects_right_position():
  # Row 0: eos at 3, last non-pad at 4 (token after eos), max id at 1.
  # Row 1: no eos (truncated) -> "eos" falls back to the last non-pad (2).
  tokens = toks([[4, 30, 6, 1, 7], [9, 8, 40]], 8)
  variables = fake_init(TextTransformer(**MU_TXT, max_len=16), tokens)
  auxes = _pooled_by_type(variables, tokens, False)
  want = {"eos": [3, 2], "last": [4, 2], "argmax": [1, 2], "first": [0, 0]}
  for pool, idx in want.items():
    enc = np.asarray(auxes[pool]["encoded"])
    np.testing.assert_allclose(auxes[pool]["pooled"], enc[[0, 1], idx], atol=1e-6, err_msg=pool)
  enc = np.asarray(auxes["gap"]["encoded"])
  np.testing.assert_allclose(auxes["gap"]["pooled"], [enc[0, :5].mean(0), enc[1, :3].mean(0)],
                             atol=1e-5)
  model = TextTransformer(**MU_TXT, num_classes=5)  # the head projects the pooled vector
  out, aux = fwd(model)(fake_init(model, tokens), tokens)
  assert out.shape == (2, 5) and aux["pooled"].shape == (2, 64)


def test_text_rejects_bad_config():
  with pytest.raises(ValueError, match="pool"):
    jax.eval_shape(TextTransformer(**MU_TXT, pool="mean").init, KEY, toks([[1]], 4))
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(TextTransformer(**MU_TXT, max_len=4).init, KEY, toks([[1]], 8))
  with pytest.raises(ValueError, match="patch"):
    jax.eval_shape(TextTransformer(vocab_size=50, variant="mu/4").init, KEY, toks([[1]], 4))


# ---------------------------------------------------------------- two towers


def test_two_towers_outputs_and_scalars():
  text = toks([[3, 4, 1], [5, 6, 7, 1]], 8)
  model = TwoTowers(image=MU_VIT, text=MU_TXT, out_dim=16, temperature_init=1 / 0.07,
                    bias_init=-10.0)
  # Real init of just the scalars: towers only create params when called.
  scalars = jax.jit(model.init)(KEY, None, None)["params"]
  assert set(scalars) == {"t_log", "b"}
  np.testing.assert_allclose(scalars["t_log"].value, math.log(1 / 0.07), rtol=1e-6)
  np.testing.assert_allclose(scalars["b"].value, -10.0)

  variables = fake_init(model, IMG, text)
  variables["params"].update(scalars)
  zimg, ztxt, aux = fwd(model)(variables, IMG, text)
  assert zimg.shape == ztxt.shape == (2, 16)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(aux["t"], 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(aux["b"], -10.0)
  p = variables["params"]
  assert p["img"]["head"]["kernel"].value.shape == p["txt"]["head"]["kernel"].value.shape == (
      64, 16)
  assert aux["img"]["pre_logits"].shape == aux["txt"]["pooled"].shape == (2, 64)
  bound = model.bind(variables)  # a zero-init head would make every embedding 0
  assert not bound.img.head_zeroinit and not bound.txt.head_zeroinit

  z_only_img, none_txt, aux1 = fwd(model)(variables, IMG, None)
  assert none_txt is None and "txt" not in aux1
  np.testing.assert_allclose(z_only_img, zimg, atol=1e-6)
  np.testing.assert_allclose(fwd(model, "embed_image")(variables, IMG)[0], zimg, atol=1e-6)
  np.testing.assert_allclose(fwd(model, TwoTowers.embed_text)(variables, text)[0], ztxt,
                             atol=1e-6)

  no_bias = TwoTowers(image=MU_VIT, text=MU_TXT, out_dim=16)
  shapes = jax.eval_shape(no_bias.init, KEY, IMG, text)
  assert "b" not in shapes["params"]
  assert "b" not in jax.eval_shape(no_bias.apply, shapes, IMG, text)[2]


def test_bf16_compute_with_f32_params():
  text = toks([[3, 4, 1], [5, 6, 7, 1]], 8)
  model = TwoTowers(image=dict(MU_VIT, pool_type="map"), text=dict(MU_TXT, causal=True),
                    out_dim=16, bias_init=-10.0, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, KEY, IMG, text)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}
  zimg, ztxt, aux = fwd(model)(fake_init(model, IMG, text), IMG, text)
  assert aux["img"]["encoded"].dtype == jnp.bfloat16
  assert aux["txt"]["encoded"].dtype == jnp.bfloat16
  for z in (zimg, ztxt):
    assert z.dtype == jnp.float32 and np.isfinite(np.asarray(z)).all()
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-3)
  assert aux["img"]["logits"].dtype == jnp.bfloat16  # the tower's head output
