"""A family's train step, timed in a fresh process of its own.

What is read once per process (XLA_FLAGS by XLA, GLIBC_TUNABLES by the C
library at start-up) can only be compared across processes: this runs
`python -m experiments.bench_child FAMILY` under a given environment and
returns what it measured. The step is built as `./launch.sh bench` builds it
(bench_rows.StepBench). Used by `./launch.sh bench-flags` (one process per
XLA flag) and by the bench's allocator row (with and without launch.sh's
malloc tunables).
"""
from __future__ import annotations

import json
import subprocess
import sys

# The families whose step a fresh process can time.
FAMILIES = ("clip", "dit")
# What the child prints before its JSON line, so the parent finds it among
# TensorFlow's and absl's own output.
RESULT_PREFIX = "BENCH_PROCESS_RESULT "


def in_fresh_process(family: str, env: dict, repeats: int, smoke: bool,
                     data_dir: str | None) -> dict:
  """bench_child.time_step(family) in a new Python process with environment `env`: its
  result, or {"error": the process's last line} if it failed."""
  argv = [sys.executable, "-m", "experiments.bench_child", family, str(repeats),
          "smoke" if smoke else "full", data_dir or ""]
  run = subprocess.run(argv, env=env, capture_output=True, text=True)
  for line in run.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  # XLA aborts on a flag it does not know; its last words say which.
  lines = [l for l in run.stderr.splitlines() if l.strip()]
  last = lines[-1] if lines else f"exit status {run.returncode}"
  return {"error": last.split("] ", 1)[-1]}  # Without the log line's header.
