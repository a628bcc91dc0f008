"""`./launch.sh bench-flags [--families clip,dit] [--xla_flags F1,F2,...] [--out FILE] [--smoke]`.

Which XLA switches make our train steps faster on this machine? Each trial
times a family's train step, built as `./launch.sh bench` builds it
(bench_rows.StepBench), under one more entry of XLA_FLAGS. XLA reads
XLA_FLAGS once per process, so every trial is a fresh process.

The step without extra flags is timed first and again last: the spread of
those two is this machine's drift over the sweep, the yardstick for the
trials between them (`vs baseline` is the mean of the two baselines over
the trial's time; above 1: the flag is faster). A flag that XLA rejects is
a row with its error, and the sweep goes on.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from experiments import bench_process
from experiments import flags_cli
from experiments.common import fail

KNOWN = bench_process.FAMILIES
# XLA:CPU switches of jax 0.10.2 that could change the speed of a step and
# keep its results (fast math, which does not, is left out).
DEFAULT_FLAGS = (
    "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "--xla_cpu_enable_fast_min_max=true",
    "--xla_cpu_copy_insertion_use_region_analysis=true",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_enable_platform_dependent_math=false",
    "--xla_cpu_multi_thread_eigen=false",
)
FAMILIES = flags.DEFINE_list("families", list(KNOWN), f"Which train steps: {', '.join(KNOWN)}.")
XLA = flags.DEFINE_list("xla_flags", list(DEFAULT_FLAGS),
                        "The XLA flags to try, one trial each (comma-separated).")
OUT = flags.DEFINE_string("out", "bench_flags", "File stem for the .json and .md tables.")
SMOKE = flags.DEFINE_boolean("smoke", False, "One tiny shape, one repeat (for the tests).")
REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per trial (the median is reported).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of the shapes world.")


def trial(family: str, flag: str) -> dict:
  """One fresh process timing `family` with `flag` added to XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  result = bench_process.in_fresh_process(family, env, 1 if SMOKE.value else REPEATS.value,
                                          SMOKE.value, DATA_DIR.value)
  return {"family": family, "flag": flag or "(none)", **result}


def family_rows(family: str, trial_flags: list[str]) -> list[dict]:
  rows = [trial(family, "")]
  rows += [trial(family, flag) for flag in trial_flags]
  rows.append(trial(family, ""))
  baselines = [r["step_ms"] for r in (rows[0], rows[-1]) if "step_ms" in r]
  if baselines:
    mean = sum(baselines) / len(baselines)
    for r in rows:
      if "step_ms" in r:
        r["vs_baseline"] = mean / r["step_ms"]
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| family | XLA flag | compile s | step ms | vs baseline |", "|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['family']} | `{r['flag']}` | error: {r['error']} | | |")
    else:
      ratio = f"{r['vs_baseline']:.3f}" if "vs_baseline" in r else ""
      lines.append(f"| {r['family']} | `{r['flag']}` | {r['compile_s']:.1f} | "
                   f"{r['step_ms']:.0f} | {ratio} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  unknown = [f for f in FAMILIES.value if f not in KNOWN]
  if unknown:
    fail(f"unknown --families {unknown}; bench-flags times the train steps of {list(KNOWN)}.")
  not_flags = [f for f in XLA.value if not f.startswith("--xla_")]
  if not_flags:
    fail(f"--xla_flags {not_flags} are not XLA flags: each is one --xla_...=VALUE.")
  rows = []
  for family in FAMILIES.value:
    rows += family_rows(family, XLA.value)
  table = markdown(rows)
  print(table)
  with open(f"{OUT.value}.json", "w") as f:
    json.dump({"xla_flags_of_the_baseline": os.environ.get("XLA_FLAGS", ""), "rows": rows},
              f, indent=2)
  with open(f"{OUT.value}.md", "w") as f:
    f.write(table)
  print(f"Wrote {OUT.value}.json and {OUT.value}.md.")


if __name__ == "__main__":
  main(sys.argv)
