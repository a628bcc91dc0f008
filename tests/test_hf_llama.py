"""Importing Hugging Face LlamaForCausalLM weights into decoder.Decoder:
logit parity with transformers on random weights (MHA, GQA, MQA with an
explicit head_dim; tied and untied embeddings), greedy cached decoding
token-for-token against ``model.generate``, and clear errors for configs and
checkpoints the Decoder cannot represent.

The reference models are tiny transformers models with random weights (no
network), every parameter perturbed so that no zero/one-initialised weight
(RMSNorm scales) can hide a mapping bug, saved with save_pretrained and read
back through our importer as a downloaded checkpoint would be.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import assert_logically_partitioned  # noqa: E402
from parity import TOL, assert_parity, perturb_, rel_err  # noqa: E402
from multimodal.importers import hf_llama, safetensors_io as io  # noqa: E402
from multimodal.importers.safetensors_io import WeightImportError  # noqa: E402
from multimodal.models import decoder as dec, decoding  # noqa: E402

VOCAB, PAD, BOS = 97, 0, 1
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=VOCAB - 1,
            pad_token_id=PAD)
CASES = {
    "gqa_untied": dict(num_key_value_heads=2, rope_theta=500.0),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    # One kv head, and head_dim * heads (64) != hidden_size (32).
    "mqa_head_dim": dict(num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=50.0),
}


def make_hf(name):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **CASES[name]}))
  model = model.eval().float()
  # Large enough that attention is far from uniform (at HF's init scale RoPE
  # and the kv mapping barely move the logits).
  perturb_(model, scale=0.3)
  return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, hf model, saved directory, kwargs, params)."""
  name = request.param
  model = make_hf(name)
  directory = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(directory)
  kwargs, params = hf_llama.load_hf_llama(directory)
  return name, model, directory, kwargs, params


def right_padded(lengths, seed=0):
  """(ids, valid): BOS + random words, right-padded with PAD."""
  rng = np.random.RandomState(seed)
  ids = np.full((len(lengths), max(lengths)), PAD, np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = [BOS] + list(rng.randint(2, VOCAB - 1, n - 1))
  return ids, ids != PAD


@functools.partial(jax.jit, static_argnums=0)
def our_logits(model, params, ids, valid):
  x = model.apply({"params": params}, ids, method="embed")
  mask = dec.make_attention_mask(jnp.ones_like(ids), valid)
  logits, _ = model.apply({"params": params}, x, positions=decoding.prefix_positions(valid),
                          mask=mask)
  return logits


def hf_logits(model, ids, valid):
  with torch.no_grad():
    return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(valid).long()).logits.numpy()


# ====================================================================== parity


def test_logits_parity(case):
  """Right-padded batch; only valid positions are compared (a pad's output
  is garbage in both)."""
  name, model, _, kwargs, params = case
  ids, valid = right_padded([11, 7, 11])
  ours = np.asarray(our_logits(dec.Decoder(**kwargs), params, jnp.asarray(ids, jnp.int32),
                               jnp.asarray(valid)))
  ref = hf_logits(model, ids, valid)
  assert_parity(ours[valid], ref[valid], f"{name} logits")


def test_parity_is_sensitive_to_rope_and_norm_eps(case):
  """Not vacuous: a different RoPE base or RMSNorm eps, or no perturbed norm
  scales, moves the logits far beyond the tolerance."""
  name, model, _, kwargs, params = case
  ids, valid = right_padded([11, 7])
  ref = hf_logits(model, ids, valid)
  ids, valid = jnp.asarray(ids, jnp.int32), jnp.asarray(valid)
  unit_scales = jax.tree_util.tree_map_with_path(
      lambda p, a: np.ones_like(a) if "scale" in jax.tree_util.keystr(p) else a, params)
  for what, kw, p in (("rope_theta", dict(kwargs, rope_theta=kwargs["rope_theta"] * 3), params),
                      ("norm_eps", dict(kwargs, norm_eps=0.5), params),
                      ("norm scales", kwargs, unit_scales)):
    err = rel_err(np.asarray(our_logits(dec.Decoder(**kw), p, ids, valid))[valid], ref[valid])
    print(f"{name} with {what} changed: relative error {err:.2e}")
    assert err > 100 * TOL, (name, what, err)


def test_imported_kwargs_and_partitioning(case):
  name, _, directory, kwargs, params = case
  cfg = {**BASE, **CASES[name]}
  heads = cfg["num_attention_heads"]
  assert kwargs == dict(
      vocab_size=VOCAB, width=32, depth=2, num_heads=heads,
      num_kv_heads=cfg["num_key_value_heads"], head_dim=cfg.get("head_dim", 32 // heads),
      mlp_dim=48, rope_theta=cfg.get("rope_theta", 10_000.0), norm_eps=cfg["rms_norm_eps"],
      tie_embeddings=cfg.get("tie_word_embeddings", False))
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  tied = kwargs["tie_embeddings"]
  assert ("lm_head" in params) != tied
  assert ("lm_head.weight" in io.read_state_dict(directory)) != tied
  boxed = hf_llama.expected_params(kwargs)
  assert_logically_partitioned(boxed)
  io.check_tree(params, boxed)
  assert hf_llama.special_token_ids(json.load(open(f"{directory}/config.json"))) == dict(
      bos=BOS, eos=VOCAB - 1, pad=PAD)


# ====================================================================== generation


def hf_generate(model, ids, valid, n, eos):
  with torch.no_grad():
    out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(valid).long(),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=PAD)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_generation_matches_hf(case):
  """Our batch (right-padded, one jitted loop) against HF generating each
  prompt alone and the batch left-padded; then again with EOS set to a token
  HF emits mid-sequence, so rows stop (and pad) at different steps."""
  name, model, _, kwargs, params = case
  ours_model, n = dec.Decoder(**kwargs), 10
  lengths = [6, 3, 9]
  ids, valid = right_padded(lengths, seed=1)
  left = np.stack([np.roll(r, len(r) - k) for r, k in zip(ids, lengths)])

  def compare(eos):
    ours = np.asarray(decoding.generate_tokens(ours_model, params, ids, max_new_tokens=n,
                                               eos_id=eos, pad_id=PAD))
    batch = hf_generate(model, left, left != PAD, n, eos)
    for row, k in enumerate(lengths):
      alone = hf_generate(model, ids[row:row + 1, :k], valid[row:row + 1, :k], n, eos)[0]
      got = len(alone)
      np.testing.assert_array_equal(ours[row, :got], alone, err_msg=f"{name} row {row}")
      assert (ours[row, got:] == PAD).all()
      np.testing.assert_array_equal(ours[row, :batch.shape[1]], batch[row])
    return ours

  first = compare(eos=VOCAB - 1)
  row0 = first[0]
  k = next((i for i in range(2, n) if row0[i] not in row0[:i]), None)
  assert k is not None, row0
  ours = compare(eos=int(row0[k]))
  assert int(decoding.output_lengths(ours, int(row0[k]))[0]) == k + 1
  print(f"{name}: greedy tokens {first.tolist()}")


# ====================================================================== errors


@pytest.mark.parametrize("overrides, field", [
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)),
     "rope_parameters.rope_type"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "rope_parameters.partial_rotary_factor"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0)),
     "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=7), "head_dim"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=30, head_dim=None), "hidden_size"),
    (dict(model_type="mistral"), "model_type"),
])
def test_unsupported_config_fields(overrides, field):
  cfg = {**transformers.LlamaConfig(**BASE).to_dict(), **overrides}
  with pytest.raises(WeightImportError, match=f"field {field}="):
    hf_llama.decoder_kwargs_from_config(cfg)


def test_legacy_and_minimal_configs():
  """transformers 4's rope_theta / rope_scaling fields, and a config.json
  that leaves out what has a default."""
  cfg = {k: v for k, v in transformers.LlamaConfig(**BASE).to_dict().items()
         if k != "rope_parameters"}
  kwargs = hf_llama.decoder_kwargs_from_config(
      dict(cfg, rope_theta=300.0, rope_scaling=None, num_key_value_heads=None))
  assert kwargs["rope_theta"] == 300.0 and kwargs["num_kv_heads"] == 4
  minimal = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2)
  assert hf_llama.decoder_kwargs_from_config(minimal) == dict(
      vocab_size=10, width=16, depth=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
      rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False)


def test_checkpoint_errors(case):
  """Unused, missing and mis-shaped tensors, and a 'tied' head that is not
  the embedding, are refused by name; old rotary buffers are ignored."""
  name, _, directory, kwargs, _ = case
  cfg, state = io.read_model_dir(directory)
  q = "model.layers.0.self_attn.q_proj"
  with pytest.raises(WeightImportError, match=f"{q}.bias"):
    hf_llama.convert({**state, f"{q}.bias": np.zeros(32, np.float32)}, cfg)
  with pytest.raises(WeightImportError, match="model.norm.weight"):
    hf_llama.convert({k: v for k, v in state.items() if k != "model.norm.weight"}, cfg)
  with pytest.raises(WeightImportError, match=f"{q}.weight"):
    hf_llama.convert({**state, f"{q}.weight": state[f"{q}.weight"][:-8]}, cfg)
  buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)
             for i in range(2)}
  hf_llama.convert({**state, **buffers}, cfg)
  if kwargs["tie_embeddings"]:
    table = state["model.embed_tokens.weight"]
    hf_llama.convert({**state, "lm_head.weight": table.copy()}, cfg)
    with pytest.raises(WeightImportError, match="tie_word_embeddings"):
      hf_llama.convert({**state, "lm_head.weight": table + 1}, cfg)
  else:
    with pytest.raises(WeightImportError, match="lm_head.weight"):
      hf_llama.convert({k: v for k, v in state.items() if k != "lm_head.weight"}, cfg)
