"""The child of experiments/bench_process.py: times one family's train step
in this process and prints the result as one JSON line.

  python -m experiments.bench_child FAMILY REPEATS smoke|full [DATA_DIR]

It is a module of its own so that bench_process, which bench_rows uses to
start it, does not import the families it times.
"""
from __future__ import annotations

import json
import sys

from experiments import bench_families, bench_rows
from experiments.bench_process import RESULT_PREFIX


def time_step(family: str, repeats: int, smoke: bool, data_dir: str | None) -> dict:
  """In this process: compile seconds, median step ms, and the minor page
  faults of one step after the timing."""
  import resource

  from multimodal.parallel import sharding
  from multimodal.perf import measure
  settings = bench_rows.Settings(repeats=repeats, peak_flops=float("nan"), profile_dir=None,
                                 smoke=smoke)
  config = {"clip": bench_families.clip_config,
            "dit": bench_families.dit_config}[family](settings, data_dir)
  bench = bench_rows.StepBench(config)
  compile_s, seconds = bench.time_steps(settings, family, {})

  def step():
    bench.state, metrics = bench.step_fn(bench.state, bench.batch)
    measure.block((bench.state, metrics))

  with sharding.mesh_context(bench.mesh):
    step()  # The jitted function's own compile, outside the count.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return {"compile_s": compile_s, "step_ms": 1e3 * seconds, "page_faults_per_step": faults}


if __name__ == "__main__":
  family, repeats, mode, data_dir = sys.argv[1:5]
  result = time_step(family, int(repeats), mode == "smoke", data_dir or None)
  print(RESULT_PREFIX + json.dumps(result), flush=True)
