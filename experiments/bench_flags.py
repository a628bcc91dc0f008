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
import subprocess
import sys

from absl import flags

from experiments.common import fail

KNOWN = ("clip", "dit")
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
CHILD = flags.DEFINE_string("child", None, "Internal: time this family here and print JSON.")

# What a trial process prints before its JSON line, so the parent finds it
# among TensorFlow's and absl's own output.
RESULT_PREFIX = "BENCH_FLAGS_RESULT "


def time_step(family: str) -> dict:
  """In this process (its XLA_FLAGS already read): compile and median step."""
  from experiments import bench_families, bench_rows
  settings = bench_rows.Settings(repeats=1 if SMOKE.value else REPEATS.value,
                                 peak_flops=float("nan"), profile_dir=None,
                                 smoke=SMOKE.value)
  config = {"clip": bench_families.clip_config,
            "dit": bench_families.dit_config}[family](settings, DATA_DIR.value)
  compile_s, seconds = bench_rows.StepBench(config).time_steps(settings, family, {})
  return {"compile_s": compile_s, "step_ms": 1e3 * seconds}


def trial(family: str, flag: str) -> dict:
  """One fresh process timing `family` with `flag` added to XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  argv = [sys.executable, "-m", "experiments.bench_flags", f"--child={family}",
          f"--repeats={REPEATS.value}", f"--smoke={SMOKE.value}"]
  if DATA_DIR.value:
    argv.append(f"--data_dir={DATA_DIR.value}")
  run = subprocess.run(argv, env=env, capture_output=True, text=True)
  out = {"family": family, "flag": flag or "(none)"}
  for line in run.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return {**out, **json.loads(line[len(RESULT_PREFIX):])}
  # XLA aborts on a flag it does not know; its last words say which.
  lines = [l for l in run.stderr.splitlines() if l.strip()]
  last = lines[-1] if lines else f"exit status {run.returncode}"
  return {**out, "error": last.split("] ", 1)[-1]}  # Without the log line's header.


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
  flags.FLAGS(argv)
  if CHILD.value:
    print(RESULT_PREFIX + json.dumps(time_step(CHILD.value)), flush=True)
    return
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
