"""`./launch.sh bench [--families vlm] [--out FILE] [--smoke]`: benchmarks.

So far one family: `vlm`, the decoder's cached generation. For several
numbers of generated tokens N it times our jitted `decoding.generate`
(compile excluded, median of --repeats) and, side by side, transformers'
`LlamaForCausalLM.generate()` with the same shapes and config, and prints
milliseconds per token: with a KV cache a new token costs the same however
many came before it, so the column stays flat as N grows (without a cache it
would grow linearly). The table is printed and written as JSON and markdown.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from absl import flags

from experiments.common import fail

FAMILIES = flags.DEFINE_list("families", ["vlm"], "Which benchmarks: vlm.")
OUT = flags.DEFINE_string("out", "bench_results", "File stem for the .json and .md tables.")
SMOKE = flags.DEFINE_boolean("smoke", False, "One tiny shape, one repeat (for the tests).")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per row (the median is reported).")

KNOWN = ("vlm",)


def _median_seconds(fn, repeats: int) -> float:
  fn()  # Warm-up: compilation (ours) or first-call allocation (torch).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_decoding(smoke: bool, repeats: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from multimodal.models import decoder, decoding
  variant, batch, prefix = ("mu", 2, 8) if smoke else ("S", 8, 64)
  lengths = (4, 8) if smoke else (32, 64, 128, 256)
  vocab = 512
  model = decoder.Decoder(vocab_size=vocab, variant=variant)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, model._config()["width"])),
                      positions=jnp.zeros((1, 4), jnp.int32),
                      mask=jnp.ones((1, 4, 4), bool))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  prompt = np.random.default_rng(0).integers(3, vocab, (batch, prefix)).astype(np.int32)
  peer = _llama_peer(model, params, vocab)
  rows = []
  for n in lengths:
    # An EOS id the model never emits (out of the vocabulary): every row
    # generates exactly n tokens, as the peer's min_new_tokens=n forces.
    def ours(n=n):
      out = decoding.generate_tokens(model, params, prompt, max_new_tokens=n,
                                     eos_id=vocab, pad_id=0)
      jax.block_until_ready(out)
    seconds = _median_seconds(ours, repeats)
    row = {"benchmark": f"decode {variant} batch={batch} prefix={prefix}",
           "new_tokens": n, "ours_ms_per_token": 1e3 * seconds / n,
           "ours_tokens_per_s": batch * n / seconds}
    if peer is not None:
      peer_seconds = _median_seconds(lambda n=n: peer(prompt, n), repeats)
      row.update(peer_ms_per_token=1e3 * peer_seconds / n,
                 ours_over_peer_speed=peer_seconds / seconds)
    rows.append(row)
  return rows


def _llama_peer(model, params, vocab):
  """transformers' LlamaForCausalLM with our weights' shapes (random
  weights: speed does not depend on them), or None without torch."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  cfg = model._config()
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=cfg["width"], intermediate_size=cfg["mlp_dim"],
      num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
      num_key_value_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"],
      max_position_embeddings=4096, pad_token_id=0, eos_token_id=vocab - 1)
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(config).eval()

  def generate(prompt, n):
    with torch.no_grad():
      llama.generate(torch.from_numpy(prompt).long(), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False)
  return generate


def markdown(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
             for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  flags.FLAGS(argv)
  unknown = [f for f in FAMILIES.value if f not in KNOWN]
  if unknown:
    fail(f"unknown --families {unknown}; benchmarks exist for {list(KNOWN)}.")
  repeats = 1 if SMOKE.value else REPEATS.value
  rows = []
  if "vlm" in FAMILIES.value:
    rows += bench_decoding(SMOKE.value, repeats)
  table = markdown(rows)
  print(table)
  with open(f"{OUT.value}.json", "w") as f:
    json.dump(rows, f, indent=2)
  with open(f"{OUT.value}.md", "w") as f:
    f.write(table)
  print(f"Wrote {OUT.value}.json and {OUT.value}.md.")


if __name__ == "__main__":
  main(sys.argv)
