"""Autoregressive generation from a ``decoder.Decoder``, in one jitted program.

Shapes are fixed up front so one compilation serves every step: the KV cache
holds prefix_len + max_new_tokens slots, the prefix (image tokens + prompt,
as embeddings) is run once ("prefill") writing slots [0, P), and then a
``lax.while_loop`` feeds one token per step into slot P + t - 1. A step
costs one single-token pass plus attention over the fixed-size cache; it
never grows with the number of tokens already generated, and the loop exits
as soon as every row has emitted EOS.

Padded prefixes. Rows of a batch have prefixes of different lengths, padded
(usually on the right) to a common P and described by ``prefix_input_mask``.
Padding must change nothing a row computes, so:
  * RoPE positions count valid tokens only: cumsum(input_mask) - 1 in the
    prefix, so a row with n valid tokens puts its t-th new token (t >= 0) at
    position n + t, wherever the pads sit;
  * pad slots of the cache are never attended: the prefill uses
    ``make_attention_mask(mask_ar, input_mask)`` and each decoding step
    attends to the valid prefix slots plus the generated slots written so far;
  * the first new token comes from the logits at each row's LAST VALID
    prefix position, not at P - 1.
Generating a batch of right-padded prefixes therefore gives each row exactly
what generating it alone gives (tests/test_decoder.py checks this).

Sampling: greedy for temperature == 0; otherwise softmax(logits /
temperature) restricted to the top-p nucleus (the smallest set of most
probable tokens whose mass reaches top_p, never empty). Rows that have
emitted EOS produce ``pad_id`` from then on.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from multimodal.models import decoder as dec


# --------------------------------------------------------------------------
# Sampling.


def nucleus_mask(logits: jax.Array, top_p) -> jax.Array:
  """Bool mask (same shape as logits) of the top-p nucleus along the last
  axis: the most probable tokens, in order, up to and including the one at
  which the cumulative probability reaches top_p; the top token always."""
  order = jnp.argsort(-logits, axis=-1)  # Stable: ties go to the lower id first.
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), -1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p).at[..., 0].set(True)
  return jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)


def _is_static_zero(temperature) -> bool:
  return isinstance(temperature, (int, float, np.number)) and float(temperature) == 0.0


def sample_logits(logits: jax.Array, rng, temperature=0.0, top_p=1.0) -> jax.Array:
  """(B, V) logits -> (B,) int32 tokens. A Python 0 temperature is plain
  argmax (no sort, no rng); a traced one may still be 0 (argmax too)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if _is_static_zero(temperature):
    return greedy
  t = jnp.asarray(temperature, jnp.float32)
  scaled = logits.astype(jnp.float32) / jnp.maximum(t, jnp.finfo(jnp.float32).tiny)
  scaled = jnp.where(nucleus_mask(scaled, top_p), scaled, -jnp.inf)
  sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(t > 0, sampled, greedy)


def _is_eos(tokens, eos_ids):
  return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def output_lengths(tokens: jax.Array, eos_id) -> jax.Array:
  """(B, N) generated tokens -> (B,) tokens up to and including the first
  EOS (N for rows without one)."""
  is_eos = _is_eos(tokens, jnp.asarray(eos_id, jnp.int32).reshape(-1))
  return jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, tokens.shape[1])


# --------------------------------------------------------------------------
# Generation.


def prefix_positions(input_mask: jax.Array) -> jax.Array:
  """(B, P) valid-token mask -> RoPE positions counting valid tokens only
  (pads get their predecessor's position; they are never attended)."""
  return jnp.maximum(jnp.cumsum(jnp.asarray(input_mask, jnp.int32), axis=1) - 1, 0)


def next_positions(positions: jax.Array, input_mask: jax.Array) -> jax.Array:
  """(B,) the position of each row's first new token: one past its last
  valid prefix token's."""
  valid = jnp.asarray(input_mask, bool)
  return jnp.max(jnp.where(valid, positions, -1), axis=1).astype(jnp.int32) + 1


def _variables(params) -> dict:
  return {"params": params}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model: dec.Decoder, max_new_tokens: int, greedy: bool, cache_dtype, params,
              prefix_embeds, prefix_mask_ar, prefix_input_mask, prefix_pos, eos_id, pad_id,
              rng, temperature, top_p):
  variables = _variables(params)
  b, p = prefix_embeds.shape[:2]
  n = max_new_tokens
  eos_ids = jnp.asarray(eos_id, jnp.int32).reshape(-1)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  temperature = 0.0 if greedy else temperature
  valid = jnp.asarray(prefix_input_mask, bool)
  if prefix_pos is None:
    prefix_pos = prefix_positions(valid)
  next_pos = next_positions(prefix_pos, valid)

  # Prefill: the whole prefix at once into cache slots [0, P).
  mask = dec.make_attention_mask(prefix_mask_ar, valid)
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, n)))
  cache = model.init_cache(b, p + n, cache_dtype)
  logits, cache = model.apply(variables, prefix_embeds, positions=prefix_pos,
                              mask=mask, cache=cache, cache_index=0)
  last = jnp.max(jnp.where(valid, jnp.arange(p), 0), axis=1)
  first = sample_logits(logits[jnp.arange(b), last], jax.random.fold_in(rng, 0),
                        temperature, top_p)
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  key_valid = jnp.concatenate([valid, jnp.zeros((b, n), bool)], axis=1)

  def cond(state):
    t, _, _, done, _, _ = state
    return (t < n) & ~jnp.all(done)

  def step(state):
    """Feeds token t - 1 (slot P + t - 1, position next_pos + t - 1)."""
    t, prev, tokens, done, cache, key_valid = state
    slot = p + t - 1
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), bool), (0, slot))
    x = model.apply(variables, prev[:, None], method="embed")
    logits, cache = model.apply(variables, x, positions=(next_pos + t - 1)[:, None],
                                mask=key_valid[:, None, :], cache=cache, cache_index=slot)
    tok = sample_logits(logits[:, 0], jax.random.fold_in(rng, t), temperature, top_p)
    tok = jnp.where(done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
    return t + 1, tok, tokens, done | _is_eos(tok, eos_ids), cache, key_valid

  state = (jnp.int32(1), first, tokens, _is_eos(first, eos_ids), cache, key_valid)
  return jax.lax.while_loop(cond, step, state)[2]


def generate(model: dec.Decoder, params, prefix_embeds, prefix_mask_ar, prefix_input_mask, *,
             max_new_tokens: int, eos_id, pad_id: int, rng=None, temperature=0.0,
             top_p=1.0, cache_dtype: Any = jnp.float32,
             prefix_positions: jax.Array | None = None) -> jax.Array:
  """Generates up to ``max_new_tokens`` tokens after each row's prefix.

  ``params``: the Decoder's "params" collection. ``prefix_embeds`` (B, P,
  width): image tokens and prompt embeddings, concatenated by the caller;
  ``prefix_mask_ar`` (B, P): 0 = attended bidirectionally (prefix-LM),
  1 = causal; ``prefix_input_mask`` (B, P): True for real tokens (pads may
  sit anywhere, typically on the right). ``prefix_positions`` (B, P): the
  prefix's RoPE positions, when they are not ``prefix_positions(input_mask)``
  (a VLM may put all its image tokens at one position); new tokens follow
  each row's last valid one. ``eos_id``: an int or a list of ids.

  Returns (B, max_new_tokens) int32: the new tokens, EOS included, ``pad_id``
  after it (``output_lengths`` gives the lengths). Compiled once per model,
  shapes, max_new_tokens and greedy-or-not (a Python temperature of 0 is
  greedy; any other, or a traced one, samples with ``rng``); jax.jit of this
  function also works, with model and max_new_tokens static.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  greedy = _is_static_zero(temperature)
  if rng is None:
    if not greedy:
      raise ValueError("sampling (temperature != 0) needs an rng")
    rng = jax.random.PRNGKey(0)
  return _generate(model, int(max_new_tokens), greedy, np.dtype(cache_dtype), params,
                   prefix_embeds, jnp.asarray(prefix_mask_ar, jnp.int32), prefix_input_mask,
                   prefix_positions, jnp.asarray(eos_id, jnp.int32), pad_id, rng, temperature,
                   top_p)


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: dec.Decoder, params, tokens):
  return model.apply(_variables(params), tokens, method="embed")


def generate_tokens(model: dec.Decoder, params, prompt_tokens, *, max_new_tokens: int, eos_id,
                    pad_id: int, rng=None, temperature=0.0, top_p=1.0, input_mask=None,
                    cache_dtype: Any = jnp.float32) -> jax.Array:
  """Text-only LM: ``generate`` after (B, L) ``prompt_tokens``, right-padded
  with ``pad_id`` (or described by ``input_mask`` when pad_id is also a real
  token), embedded with ``model.embed`` and attended fully causally."""
  tokens = jnp.asarray(prompt_tokens, jnp.int32)
  valid = tokens != pad_id if input_mask is None else jnp.asarray(input_mask, bool)
  embeds = _embed(model, params, tokens)
  return generate(model, params, embeds, jnp.ones_like(tokens), valid,
                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, rng=rng,
                  temperature=temperature, top_p=top_p, cache_dtype=cache_dtype)
