"""The benchmark of each model family: its shapes and its rows.

Full mode uses the reference shapes (the CLIP one of issue #8, the
configs' defaults for DiT and the VLM); --smoke shrinks each to a tiny
shape on a tiny shapes world, so the test suite can run every code path.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import numpy as np

from experiments import bench_peers
from experiments.bench_rows import (Settings, allocator_row, before_row, loop_rows,
                                    median_throughput, peer_throughput, row,
                                    timed_and_profiled, train_rows)
from multimodal.config import config_lib
from multimodal.parallel import sharding
from multimodal.perf import measure
from multimodal.train import trainer

# The shapes world of --smoke: as the test suite's (tests/conftest.py), so
# the tests' prepared copy is reused.
SMOKE_WORLD = dict(image_size=32, train_examples=2_000, eval_examples=200, seed=0)
# The CLIP reference shape: both towers width 192, depth 6, 3 heads; 64x64
# images in 8x8 patches; 32 text tokens; batch 64; f32; AdamW.
CLIP_TOWER = dict(variant=None, width=192, depth=6, mlp_dim=768, num_heads=3)
CLIP_SMOKE_TOWER = dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2)
DIT_SAMPLER_STEPS, DIT_CFG_SCALE = 50, 3.0
DECODE_LENGTHS = (32, 64, 128, 256)
LOOP_STEPS = 20  # Steps per timed run of the training-loop rows.
# DiT's step as two microbatches written out one after the other
# (accumulate.py): the same update, and on this CPU faster than the whole
# batch at once, whose activations outgrow the cache (docs/performance.md).
# Not CLIP's: with its last blocks on the pooled tokens only, its step ran
# as fast either way (the two timed in turn in one process).
MICROBATCHES = dict(grad_accum_steps=2, grad_accum_unroll=True)
WHOLE_BATCH = dict(grad_accum_steps=1, grad_accum_unroll=False)


def _on_world(config, settings: Settings, data_dir: str | None):
  config.input.data_dir = data_dir
  if settings.smoke:
    config.input.shapes_world = dict(SMOKE_WORLD)
  return config


def matmul_row(peak: dict, settings: Settings) -> dict:
  """The peak itself, beside torch's matmul at the same size."""
  peer = None
  if bench_peers.available():
    peer = bench_peers.matmul_flops(peak["size"], settings.repeats)
  n = peak["size"]
  return row(f"matmul peak f32 {n}x{n}", "GFLOP/s", peak["flops_per_s"] / 1e9,
             peer_name="torch.matmul" if peer else None,
             peer=peer / 1e9 if peer else None)


# --------------------------------------------------------------------------
# CLIP.


def clip_config(settings: Settings, data_dir: str | None):
  from configs import clip_shapes
  tower = CLIP_SMOKE_TOWER if settings.smoke else CLIP_TOWER
  size, patch, text_len, batch = (32, 8, 16, 8) if settings.smoke else (64, 8, 32, 64)
  config = clip_shapes.get_config(f"res={size},batch={batch},text_len={text_len}")
  # HF CLIP's layout: a cls token (pool "tok"), a patch stem, causal text
  # pooled at EOS (the config's already). Each tower's last block computes
  # the pooled token alone, all the loss reads (the same embeddings).
  config.model.image = dict(**tower, patch_size=(patch, patch), stem="patch",
                            pool_type="tok", posemb="learn", last_block_pooled_only=True)
  config.model.text = dict(**tower, causal=True, pool="eos", last_block_pooled_only=True)
  return _on_world(config, settings, data_dir)


def clip_rows(settings: Settings, data_dir: str | None) -> list[dict]:
  config = clip_config(settings, data_dir)
  image = config.model.image
  size, batch = config.input.image_size, config.input.batch_size
  shape = dict(width=image["width"], depth=image["depth"], num_heads=image["num_heads"],
               mlp_dim=image["mlp_dim"])
  rows, bench = train_rows(
      "clip", config, settings, peer_name="transformers CLIPModel",
      peer_factory=lambda bench: bench_peers.clip_train_step(
          image_size=size, patch_size=image["patch_size"][0], **shape,
          text_len=config.input.tokenizer.max_len, vocab_size=bench.task.tokenizer.vocab_size,
          out_dim=config.model.out_dim, batch=batch))
  rows.append(before_row("last blocks on the pooled tokens only", rows[0], config, settings,
                         config_before={f"model.{tower}.last_block_pooled_only": False
                                        for tower in ("image", "text")}))
  if not settings.smoke:  # Two more processes; the suite's smoke run has DiT's.
    rows.append(allocator_row("clip", batch, settings, data_dir))
  rows += loop_rows("clip", bench, settings, steps=3 if settings.smoke else LOOP_STEPS)
  rows += _clip_eval_rows(bench, settings, shape)
  return rows


def _clip_eval_rows(bench, settings: Settings, shape: dict) -> list[dict]:
  """The zero-shot evaluator: its jitted image encoder on one batch (vs
  CLIPModel.get_image_features), and a whole evaluation, pipeline included."""
  config = bench.config
  evaluator = next(e for e in bench.task.evaluators(bench.mesh)
                   if e.name == "zero_shot_shape")
  params = trainer.eval_params(bench.state)
  batch = next(iter(evaluator.batches()))
  count = int(batch["image"].shape[0])
  with sharding.mesh_context(bench.mesh):
    encode = lambda: measure.block(evaluator.encode_images(params, batch["image"]))
    images_per_s, seconds, profile = timed_and_profiled(
        encode, count, settings, "clip_eval_forward")
  peer = peer_throughput(lambda: bench_peers.clip_embed_images(
      image_size=config.input.image_size, patch_size=config.model.image["patch_size"][0],
      **shape, out_dim=config.model.out_dim, batch=count), count, settings)
  forward = row("clip eval image encoder", "images/s", images_per_s, seconds=seconds,
                peer_name="CLIPModel.get_image_features", peer=peer, **profile)
  # End to end: tf.data decode and resize, the class embeddings, every batch.
  total = sum(int(np.sum(b["_mask"])) for b in evaluator.batches())
  with sharding.mesh_context(bench.mesh):
    measure.reset_peak_memory()
    end_to_end, _ = median_throughput(lambda: evaluator.run(params), total, settings)
  whole = row(f"clip zero-shot eval, {total} images", "images/s", end_to_end,
              peak_mib=measure.peak_memory_mib())
  return [forward, whole]


# --------------------------------------------------------------------------
# DiT.


def dit_config(settings: Settings, data_dir: str | None):
  from configs import dit_shapes
  # --smoke: 16 examples, so the two microbatches span the suite's 8 devices.
  config = dit_shapes.get_config("variant=mu/2,batch=16" if settings.smoke else None)
  config.update(MICROBATCHES)
  if settings.smoke:  # The guided batch of 32 rows in parts, as in full mode.
    config.sample_microbatch_size = 8
  return _on_world(config, settings, data_dir)


def dit_rows(settings: Settings, data_dir: str | None) -> list[dict]:
  from multimodal.models import dit
  config = dit_config(settings, data_dir)
  sizes = dit.decode_variant(config.model.variant)
  size, batch = config.input.image_size, config.input.batch_size
  shape = dict(image_size=size, patch_size=sizes["patch_size"][0], in_channels=3,
               width=sizes["width"], depth=sizes["depth"], num_heads=sizes["num_heads"],
               num_classes=config.model.num_classes)
  rows, bench = train_rows(
      "dit", config, settings, peer_name="diffusers DiTTransformer2DModel",
      peer_factory=lambda bench: bench_peers.dit_train_step(
          **shape, batch=batch, ema_decay=config.get("ema_decay")))
  rows.append(before_row("two unrolled microbatches", rows[0], config, settings,
                         config_before=WHOLE_BATCH))
  rows.append(allocator_row("dit", batch, settings, data_dir))
  return rows + _dit_sampler_rows(bench, settings, shape)


def _dit_sampler_rows(bench, settings: Settings, shape: dict) -> list[dict]:
  """The DDIM sampler with guidance (vs diffusers' DiTPipeline loop), and
  its before/after row for the model calls in microbatches."""
  batch, steps = bench.batch_size, 2 if settings.smoke else DIT_SAMPLER_STEPS
  labels = np.arange(batch, dtype=np.int32) % bench.config.model.num_classes
  condition = bench.task.condition_for_labels(labels)
  params = trainer.eval_params(bench.state)

  def timed(microbatch_size=None, profile_as=""):
    sample = bench.task.sampler(bench.mesh, steps=steps, cfg_scale=DIT_CFG_SCALE,
                                microbatch_size=microbatch_size)
    with sharding.mesh_context(bench.mesh):
      measure.reset_peak_memory()
      _, compile_s = measure.compile_seconds(sample, params, condition)
      run = lambda: measure.block(sample(params, condition))
      steps_per_s, seconds, profile = timed_and_profiled(
          run, steps, settings if profile_as else dataclasses.replace(settings, profile_dir=None),
          profile_as)
    return steps_per_s, seconds, compile_s, measure.peak_memory_mib(), profile

  steps_per_s, seconds, compile_s, peak_mib, profile = timed(profile_as="dit_sampler")
  peer = peer_throughput(lambda: bench_peers.dit_sample_loop(
      **shape, batch=batch, steps=steps, cfg_scale=DIT_CFG_SCALE), steps, settings)
  name = f"dit DDIM sampler, batch {batch}, cfg {DIT_CFG_SCALE}"
  sampler = row(name, "steps/s", steps_per_s, seconds=seconds / steps, compile_s=compile_s,
                peak_mib=peak_mib, peer_name="diffusers DiTPipeline loop", peer=peer, **profile)
  size = bench.config.sample_microbatch_size
  before_per_s, _, _, before_mib, _ = timed(microbatch_size=0)
  before = row(f"{name}, the model on {size} rows at a time", "steps/s", steps_per_s,
               seconds=seconds / steps, peak_mib=peak_mib,
               peer_name="before: sample_microbatch_size=0", peer=before_per_s,
               before_peak_mib=before_mib)
  return [sampler, before]


# --------------------------------------------------------------------------
# VLM.


def vlm_rows(settings: Settings, data_dir: str | None) -> list[dict]:
  """The VLM's stage-tune train step (vision tower frozen, as configured)
  and its decoding."""
  with tempfile.TemporaryDirectory() as vision_dir:
    config = vlm_config(settings, data_dir, vision_dir)
    rows, _ = train_rows("vlm", config, settings)
  return rows + decode_rows(settings)


def vlm_config(settings: Settings, data_dir: str | None, vision_dir: str):
  """configs/vlm_shapes.py's stage tune on the 64-token vision tower of
  configs/clip_shapes.py (not the config's default 9-token cell tower, whose
  step the VLM's decoder dominates), whose run `vision_dir` stands in for:
  its config.json alone, as speed does not depend on the weights."""
  from configs import clip_shapes, vlm_shapes
  size, batch = (32, 8) if settings.smoke else (64, 64)
  vision = _on_world(clip_shapes.get_config(f"res={size}"), settings, data_dir)
  if settings.smoke:
    vision.model.image = dict(**CLIP_SMOKE_TOWER, patch_size=(8, 8), stem="patch",
                              pool_type="gap", posemb="learn")
  with open(os.path.join(vision_dir, "config.json"), "w") as f:
    f.write(config_lib.to_json(vision))
  # What the task's check of a run's workdir looks for; the bench never
  # restores it (StepBench starts from a fresh init).
  os.makedirs(os.path.join(vision_dir, "checkpoints", "0"))
  config = vlm_shapes.get_config(f"res={size},batch={batch},tower=mu/8,vision_layer=-1")
  config.model.vision.workdir = vision_dir
  return _on_world(config, settings, data_dir)


def decode_rows(settings: Settings) -> list[dict]:
  """Cached greedy decoding at several generated lengths N: with a KV cache
  a new token costs the same however many came before it, so ms per token
  stays flat as N grows (without a cache it would grow linearly)."""
  import jax.numpy as jnp
  from multimodal.models import decoder, decoding
  variant, batch, prefix = ("mu", 2, 8) if settings.smoke else ("S", 8, 64)
  lengths = (4, 8) if settings.smoke else DECODE_LENGTHS
  vocab = 512
  model = decoder.Decoder(vocab_size=vocab, variant=variant)
  width = model._config()["width"]
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, width)),
                      positions=jnp.zeros((1, 4), jnp.int32),
                      mask=jnp.ones((1, 4, 4), bool))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  prompt = np.random.default_rng(0).integers(3, vocab, (batch, prefix)).astype(np.int32)
  peer = None
  if bench_peers.available():
    cfg = model._config()
    peer = bench_peers.llama_generate(
        width=cfg["width"], mlp_dim=cfg["mlp_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"],
        head_dim=cfg["head_dim"], vocab=vocab, prompt=prompt)
  rows = []
  for n in lengths:
    # An EOS id the model never emits (out of the vocabulary): every row
    # generates exactly n tokens, as the peer's min_new_tokens=n forces.
    generate = lambda n=n: measure.block(decoding.generate_tokens(
        model, params, prompt, max_new_tokens=n, eos_id=vocab, pad_id=0))
    tokens_per_s, seconds = median_throughput(generate, batch * n, settings)
    peer_rate = None
    if peer is not None:
      peer_rate = batch * n / measure.median_seconds(lambda n=n: peer(n), settings.repeats)
    rows.append(row(f"vlm decode {variant}, batch {batch}, prompt {prefix}, {n} new",
                    "tokens/s", tokens_per_s, ms_per_token=1e3 * seconds / n,
                    peer_name="LlamaForCausalLM.generate", peer=peer_rate))
  return rows


FAMILIES = {"clip": clip_rows, "dit": dit_rows, "vlm": vlm_rows}
