"""The Llama-style Decoder and its generation loop: parameter partitioning,
attention masks, RoPE, KV-cache consistency, grouped-query attention, top-p
sampling, EOS handling and padded batches (tests/test_hf_llama.py checks
parity with transformers)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_logically_partitioned
from multimodal.models import decoder as dec, decoding

pytestmark = pytest.mark.unit

VOCAB = 61


def make_model(**kw):
  return dec.Decoder(vocab_size=VOCAB, **{"variant": "mu", **kw})


def init_params(model, seed=0):
  """Random float32 numpy params in the model's tree (from jax.eval_shape:
  compiling the real init costs seconds per model on CPU), each weight
  N(0, 1/fan_in) and each RMSNorm scale 1 + N(0, 0.3^2), so that no
  one-initialised weight can hide a bug."""
  x = jnp.zeros((1, 1, model._config()["width"]))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), x, positions=jnp.zeros((1, 1), jnp.int32),
      mask=jnp.ones((1, 1, 1), bool))["params"]))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if "scale" in name:
      return (1 + 0.3 * rng.randn(*shape)).astype(np.float32)
    fan_in = {"embedding": shape[-1], "out_kernel": shape[0] * shape[1]}.get(
        name.split("'")[-2], shape[0])
    return (rng.randn(*shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def run(model, params, x, positions, mask, cache=None, cache_index=None):
  return model.apply({"params": params}, x, positions=positions, mask=mask, cache=cache,
                     cache_index=cache_index)


@functools.partial(jax.jit, static_argnums=0)
def embed(model, params, tokens):
  return model.apply({"params": params}, jnp.asarray(tokens), method="embed")


@pytest.fixture(scope="module")
def mu():
  model = make_model()
  return model, init_params(model)


# ====================================================================== params


@pytest.mark.parametrize("tie", [False, True])
def test_params_logically_partitioned(tie):
  model = make_model(tie_embeddings=tie)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 64)),
                         positions=jnp.zeros((1, 3), jnp.int32), mask=dec.causal_mask(3))
  params = boxed["params"]
  assert_logically_partitioned(params)
  assert ("lm_head" in params) != tie
  attn = params["layers_1"]["attn"]
  assert attn["query_kernel"].value.shape == (64, 4, 16)
  assert attn["key_kernel"].value.shape == (64, 2, 16)
  assert attn["key_kernel"].names == ("embed", "kv_heads", "kv")
  assert params["embedding"].value.shape == (VOCAB, 64)
  assert sorted(params) == sorted(["embedding", "final_norm", "layers_0", "layers_1"]
                                  + ([] if tie else ["lm_head"]))


def test_variants_and_overrides():
  cfg = make_model(depth=1, num_kv_heads=1, head_dim=8)._config()
  assert cfg == dict(width=64, depth=1, num_heads=4, num_kv_heads=1, mlp_dim=128, head_dim=8)
  cfg = dec.Decoder(VOCAB, width=96, depth=1, num_heads=3)._config()
  assert cfg["num_kv_heads"] == 3 and cfg["head_dim"] == 32 and cfg["mlp_dim"] == 256
  for name in dec.VARIANTS:
    dec.resolve_config(name)
  with pytest.raises(ValueError, match="Unknown decoder variant"):
    make_model(variant="XL")._config()
  with pytest.raises(ValueError, match="must divide num_heads"):
    make_model(num_kv_heads=3)._config()
  with pytest.raises(ValueError, match="explicit"):
    dec.Decoder(VOCAB, width=64)._config()


def test_init_cache_layout():
  cache = make_model(num_kv_heads=1).init_cache(3, 11, jnp.bfloat16)
  assert set(cache) == {"k", "v"}
  assert cache["k"].shape == (2, 3, 11, 1, 16) and cache["v"].dtype == jnp.bfloat16


# ====================================================================== masks


def test_prefix_lm_mask_by_hand():
  # Row 0: 2 bidirectional prefix tokens, 2 causal ones, then a pad.
  # Row 1: big_vision's prefix-LM example, [0 0 0 1 1 1] (6 tokens, 5 here).
  mask_ar = jnp.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
  input_mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  expected = np.array([
      [[1, 1, 0, 0, 0],
       [1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0],
       [0, 0, 0, 0, 0]],
      [[1, 1, 1, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0],
       [1, 1, 1, 1, 1]]], bool)
  np.testing.assert_array_equal(dec.make_attention_mask(mask_ar, input_mask), expected)


def test_all_ones_is_causal_all_zeros_is_full():
  ones = jnp.ones((2, 6), jnp.int32)
  tril = np.tril(np.ones((6, 6), bool))
  np.testing.assert_array_equal(dec.prefix_lm_mask(ones), np.stack([tril, tril]))
  np.testing.assert_array_equal(dec.causal_mask(6)[0], tril)
  np.testing.assert_array_equal(
      dec.make_attention_mask(ones, jnp.ones((2, 6), bool)), np.stack([tril, tril]))
  assert dec.prefix_lm_mask(jnp.zeros((1, 4), jnp.int32)).all()


# ====================================================================== RoPE


def rope_numpy(x, positions, theta):
  """HF Llama's formula: x * cos + rotate_half(x) * sin, (p * f | p * f)."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  angles = positions[..., None].astype(np.float64) * inv_freq
  emb = np.concatenate([angles, angles], -1)[:, :, None, :]
  rotate_half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * np.cos(emb) + rotate_half * np.sin(emb)


@pytest.mark.parametrize("theta", [10_000.0, 500.0])
def test_rope_matches_numpy(theta):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, 3, 8).astype(np.float32)
  positions = rng.randint(0, 300, (2, 7))
  ours = dec.apply_rope(jnp.asarray(x), jnp.asarray(positions), theta)
  np.testing.assert_allclose(ours, rope_numpy(x.astype(np.float64), positions, theta),
                             atol=2e-4, rtol=0)


def test_rope_scores_depend_on_offset_only():
  rng = np.random.RandomState(1)
  q, k = (jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32) for _ in range(2))

  def score(pq, pk):
    a = dec.apply_rope(q, jnp.array([[pq]]))
    b = dec.apply_rope(k, jnp.array([[pk]]))
    return float(jnp.sum(a * b))

  assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


# ====================================================================== cache


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cached_decoding_matches_uncached(kv_heads):
  """Prefill the (bidirectional) prefix plus one token into a longer cache,
  then feed the rest one token at a time: the logits of every valid query
  equal the uncached pass over the whole sequence."""
  model = make_model(num_kv_heads=kv_heads)
  params = init_params(model, seed=kv_heads)
  b, length, prefill, extra = 2, 9, 4, 3
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, VOCAB, (b, length)))
  mask_ar = jnp.array([[0, 0, 0] + [1] * 6, [0] * 2 + [1] * 7])
  valid = jnp.array([[1] * 9, [1] * 7 + [0] * 2], bool)
  mask = dec.make_attention_mask(mask_ar, valid)
  positions = decoding.prefix_positions(valid)
  x = embed(model, params, tokens)
  full, none = run(model, params, x, positions, mask)
  assert none is None and full.dtype == jnp.float32 and full.shape == (b, length, VOCAB)

  cache = model.init_cache(b, length + extra)
  padded = jnp.pad(mask, ((0, 0), (0, 0), (0, extra)))
  out, cache = run(model, params, x[:, :prefill], positions[:, :prefill],
                   padded[:, :prefill], cache, 0)
  chunks = [out]
  for i in range(prefill, length):
    out, cache = run(model, params, x[:, i:i + 1], positions[:, i:i + 1], padded[:, i:i + 1],
                      cache, jnp.int32(i))
    chunks.append(out)
  cached = jnp.concatenate(chunks, axis=1)
  assert np.abs(np.asarray(cache["k"][:, :, length:])).max() == 0  # Unwritten slots.
  for row in range(b):
    n = int(valid[row].sum())
    np.testing.assert_allclose(cached[row, :n], full[row, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(kv_heads):
  """Query head h reads kv head h // groups: repeating each kv head `groups`
  times (HF's repeat_kv) gives an MHA model computing the same logits."""
  gqa = make_model(num_kv_heads=kv_heads)
  mha = make_model(num_kv_heads=4)
  params = init_params(gqa, seed=7)
  groups = 4 // kv_heads
  mha_params = jax.tree.map(lambda a: a, params)
  for i in range(2):
    attn = mha_params[f"layers_{i}"]["attn"]
    for name in ("key_kernel", "value_kernel"):
      attn[name] = np.repeat(params[f"layers_{i}"]["attn"][name], groups, axis=1)
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 6, 64), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  ours, _ = run(gqa, params, x, positions, dec.causal_mask(6))
  ref, _ = run(mha, mha_params, x, positions, dec.causal_mask(6))
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  # And the tiled (wrong) grouping differs.
  for i in range(2):
    attn = mha_params[f"layers_{i}"]["attn"]
    for name in ("key_kernel", "value_kernel"):
      attn[name] = np.tile(params[f"layers_{i}"]["attn"][name], (1, groups, 1))
  wrong, _ = run(mha, mha_params, x, positions, dec.causal_mask(6))
  if kv_heads > 1:
    assert np.abs(np.asarray(wrong - ref)).max() > 1e-3


# ====================================================================== sampling


def nucleus_numpy(logits, top_p):
  """The smallest set of most probable tokens whose mass reaches top_p."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  keep = np.zeros(logits.shape, bool)
  for row in range(logits.shape[0]):
    order = np.argsort(-probs[row], kind="stable")
    k = np.searchsorted(np.cumsum(probs[row][order]), top_p) + 1
    keep[row, order[:max(1, min(k, logits.shape[1]))]] = True
  return keep


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.6, 0.9, 1.0])
def test_nucleus_mask_matches_numpy(top_p):
  logits = np.random.RandomState(0).randn(6, 40) * 2
  ours = np.asarray(decoding.nucleus_mask(jnp.asarray(logits, jnp.float32), top_p))
  np.testing.assert_array_equal(ours, nucleus_numpy(logits, top_p))


def test_samples_stay_in_nucleus_with_its_probabilities():
  logits = jnp.asarray(np.random.RandomState(1).randn(3, 30) * 1.5, jnp.float32)
  temperature, top_p = 0.8, 0.7
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = np.asarray(jax.vmap(
      lambda k: decoding.sample_logits(logits, k, temperature, top_p))(keys))  # (n, 3)
  scaled = np.asarray(logits, np.float64) / temperature
  keep = nucleus_numpy(scaled, top_p)
  for row in range(3):
    assert keep[row, draws[:, row]].all()
    probs = np.where(keep[row], np.exp(scaled[row] - scaled[row].max()), 0)
    probs /= probs.sum()
    freq = np.bincount(draws[:, row], minlength=30) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert set(np.unique(draws[:, row])) == set(np.flatnonzero(keep[row]))


def test_tiny_top_p_and_zero_temperature_are_greedy():
  logits = jnp.asarray(np.random.RandomState(2).randn(4, 25), jnp.float32)
  greedy = np.argmax(logits, -1)
  for seed in range(5):
    rng = jax.random.PRNGKey(seed)
    np.testing.assert_array_equal(decoding.sample_logits(logits, rng, 1.0, 1e-8), greedy)
    np.testing.assert_array_equal(decoding.sample_logits(logits, rng, 0.0, 0.9), greedy)
    np.testing.assert_array_equal(
        decoding.sample_logits(logits, rng, jnp.float32(0.0), 0.9), greedy)


# ====================================================================== generation


PROMPTS = np.array([[5, 9, 13, 2, 7, 0], [11, 3, 0, 0, 0, 0]])  # Right-padded with 0.


def test_eos_stops_rows_and_pads_after(mu):
  model, params = mu
  free = np.asarray(decoding.generate_tokens(model, params, PROMPTS, max_new_tokens=10,
                                             eos_id=-1, pad_id=0))
  # EOS := a token row 0 first emits at step k >= 1.
  k = next((i for i in range(1, 10) if free[0, i] not in free[0, :i]), 0)
  eos = int(free[0, k])
  out = np.asarray(decoding.generate_tokens(model, params, PROMPTS, max_new_tokens=10,
                                            eos_id=eos, pad_id=0))
  lengths = np.asarray(decoding.output_lengths(out, eos))
  for row in range(2):
    hits = np.flatnonzero(free[row] == eos)
    n = hits[0] + 1 if len(hits) else 10
    assert lengths[row] == n
    np.testing.assert_array_equal(out[row, :n], free[row, :n])
    assert (out[row, n:] == 0).all()
  assert lengths[0] == k + 1 and out[0, k] == eos
  # A list of EOS ids stops at whichever comes first.
  out2 = decoding.generate_tokens(model, params, PROMPTS, max_new_tokens=10,
                                  eos_id=[-5, eos], pad_id=0)
  np.testing.assert_array_equal(out2, out)


def test_padded_prefixes_equal_rows_alone(mu):
  """Image tokens + prompts of different lengths, right-padded to a common
  prefix: each row generates what it generates alone, unpadded."""
  model, params = mu
  rng = np.random.RandomState(5)
  b, image_len, prompt_lens = 3, 4, (3, 1, 5)
  p = image_len + max(prompt_lens)
  images = rng.randn(b, image_len, 64).astype(np.float32)
  prompts = rng.randint(1, VOCAB, (b, max(prompt_lens)))
  embeds = np.asarray(embed(model, params, prompts))
  prefix = np.concatenate([images, embeds], axis=1)
  valid = np.zeros((b, p), bool)
  for row, n in enumerate(prompt_lens):
    valid[row, :image_len + n] = True
  prefix = np.where(valid[..., None], prefix, 123.0)  # Garbage in pads must not matter.
  mask_ar = np.zeros((b, p), np.int32)  # Prefix-LM: the whole prefix bidirectional.
  kw = dict(max_new_tokens=7, eos_id=-1, pad_id=0)
  batched = np.asarray(decoding.generate(model, params, prefix, mask_ar, valid, **kw))
  for row, n in enumerate(prompt_lens):
    m = image_len + n
    alone = decoding.generate(model, params, prefix[row:row + 1, :m], mask_ar[row:row + 1, :m],
                              valid[row:row + 1, :m], **kw)
    np.testing.assert_array_equal(batched[row], np.asarray(alone)[0])


def test_generate_equals_step_by_step_argmax(mu):
  """Greedy generation = repeatedly appending the argmax of an uncached,
  full-sequence causal pass (no cache, no loop; one fixed-length buffer)."""
  model, params = mu
  out = np.asarray(decoding.generate_tokens(model, params, PROMPTS, max_new_tokens=5,
                                            eos_id=-1, pad_id=0))
  size = PROMPTS.shape[1] + 5
  for row in range(2):
    seq = [int(t) for t in PROMPTS[row] if t != 0]
    for _ in range(5):
      n = len(seq)
      valid = jnp.arange(size) < n
      x = embed(model, params, jnp.asarray([seq + [0] * (size - n)]))
      logits, _ = run(model, params, x, jnp.arange(size)[None],
                      dec.causal_mask(size) & valid[None, None, :])
      seq.append(int(jnp.argmax(logits[0, n - 1])))
    np.testing.assert_array_equal(out[row], seq[-5:])


def test_generate_jits_as_a_whole_and_samples(mu):
  model, params = mu
  embeds = embed(model, params, PROMPTS)
  mask_ar, valid = np.ones(PROMPTS.shape, np.int32), PROMPTS != 0
  jitted = jax.jit(decoding.generate, static_argnames=("model", "max_new_tokens"))
  kw = dict(max_new_tokens=6, eos_id=1, pad_id=0)
  greedy = decoding.generate(model, params, embeds, mask_ar, valid, **kw)
  traced_zero = jitted(model, params, embeds, mask_ar, valid, rng=jax.random.PRNGKey(0),
                       temperature=0.0, top_p=0.9, **kw)
  np.testing.assert_array_equal(traced_zero, greedy)
  samples = [np.asarray(jitted(model, params, embeds, mask_ar, valid,
                               rng=jax.random.PRNGKey(s), temperature=1.5, top_p=0.95, **kw))
             for s in range(3)]
  assert all(s.shape == (2, 6) and s.dtype == np.int32 for s in samples)
  assert len({s.tobytes() for s in samples}) > 1
  with pytest.raises(ValueError, match="rng"):
    decoding.generate(model, params, embeds, mask_ar, valid, temperature=1.0, **kw)
