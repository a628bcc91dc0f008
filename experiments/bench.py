"""`./launch.sh bench [--families clip,dit,vlm] [--out FILE] [--profile DIR] [--smoke]`.

Measures, side by side with PyTorch peers at the same shapes, batch and
precision (f32), on whatever devices JAX sees:

  matmul peak     the f32 matmul FLOP/s of this machine, measured first; MFU
                  is model FLOPs per second over it (multimodal/flops.py).
  clip            the train step at the reference shape (both towers width
                  192, depth 6, 3 heads; 64x64 images, patch 8; text 32;
                  batch 64; AdamW) vs transformers' CLIPModel; the input
                  pipeline; the zero-shot evaluator's image encoder vs
                  CLIPModel.get_image_features, and the evaluator end to end.
  dit             configs/dit_shapes.py's train step vs diffusers'
                  DiTTransformer2DModel; the pipeline; the DDIM sampler with
                  guidance vs diffusers' DiTPipeline loop, in steps/s.
  vlm             the decoder's cached greedy decoding vs
                  LlamaForCausalLM.generate() at several generated lengths
                  (ms per token stays flat with the cache).

Every row: compile time, median step time over --repeats after warm-up,
throughput, model GFLOP per step, MFU, peak host memory, and ours/peer
(> 1: we are faster). The table is printed and written to --out as .json
and .md. --profile DIR records a jax.profiler trace of a few steps of each
of our rows (open with `tensorboard --logdir DIR`).
"""
from __future__ import annotations

import json
import platform
import sys

from absl import flags

from experiments import flags_cli
from experiments.common import fail

KNOWN = ("clip", "dit", "vlm")
FAMILIES = flags.DEFINE_list("families", list(KNOWN), f"Which benchmarks: {', '.join(KNOWN)}.")
OUT = flags.DEFINE_string("out", "bench_results", "File stem for the .json and .md tables.")
PROFILE = flags.DEFINE_string("profile", None, "Write jax.profiler traces here.")
SMOKE = flags.DEFINE_boolean("smoke", False, "One tiny shape per row, one repeat (for the tests).")
REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per row (the median is reported).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of the shapes world "
                               "(default: the configs' default, as `./launch.sh run`).")

# The columns of the markdown table, in order, with their headers.
COLUMNS = (("benchmark", "benchmark"), ("compile_s", "compile s"), ("step_ms", "step ms"),
           ("ours", "ours"), ("unit", "unit"), ("model_gflop", "model GFLOP"),
           ("mfu", "MFU"), ("ms_per_token", "ms/token"), ("peak_mib", "peak MiB"),
           ("peer_name", "peer"),
           ("peer", "peer"), ("ours_over_peer", "ours/peer"),
           ("before_peak_mib", "before: peak MiB"))


def _cell(key: str, value) -> str:
  if value is None:
    return ""
  if key == "mfu":
    return f"{100 * value:.0f}%"
  if isinstance(value, float):
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
  return str(value)


def markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in rows:
    lines.append("| " + " | ".join(_cell(k, row.get(k)) for k, _ in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def machine() -> dict:
  import jax
  from experiments import bench_peers
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "processor": platform.processor() or platform.machine(),
          "peers": bench_peers.torch_version()}


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  unknown = [f for f in FAMILIES.value if f not in KNOWN]
  if unknown:
    fail(f"unknown --families {unknown}; benchmarks exist for {list(KNOWN)}.")
  from experiments import bench_families, bench_rows
  from multimodal.perf import measure
  peak = measure.matmul_peak_flops(sizes=(256,) if SMOKE.value else measure.PEAK_MATMUL_SIZES)
  settings = bench_rows.Settings(repeats=1 if SMOKE.value else REPEATS.value,
                                 peak_flops=peak["flops_per_s"], profile_dir=PROFILE.value,
                                 smoke=SMOKE.value)
  rows = [bench_families.matmul_row(peak, settings)]
  for family in FAMILIES.value:
    rows += bench_families.FAMILIES[family](settings, DATA_DIR.value)
  table = markdown(rows)
  print(table)
  with open(f"{OUT.value}.json", "w") as f:
    json.dump({"machine": machine(), "rows": rows}, f, indent=2)
  with open(f"{OUT.value}.md", "w") as f:
    f.write(table)
  print(f"Wrote {OUT.value}.json and {OUT.value}.md.")


if __name__ == "__main__":
  main(sys.argv)
