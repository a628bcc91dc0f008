"""`./launch.sh bench-flags` in its smoke mode: each XLA flag is tried in its
own process beside two baselines, a flag XLA rejects is reported, not fatal,
and bad arguments fail in one line. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def bench_flags(*args):
  # The suite's own XLA_FLAGS (8 host devices) would reach the trials; the
  # sweep is about one device's step, as `./launch.sh bench` runs it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "experiments.bench_flags", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_bench_flags_smoke(data_dir, tmp_path):
  # One trial, of a flag XLA does not know: its process fails at once, and
  # XLA's complaint shows that the flag reached the trial's XLA_FLAGS.
  out = tmp_path / "flags"
  run = bench_flags("--smoke", "--families=dit", f"--data_dir={data_dir}", f"--out={out}",
                    "--xla_flags=--xla_cpu_no_such_switch=1")
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((tmp_path / "flags.json").read_text())["rows"]
  assert [r["flag"] for r in rows] == ["(none)", "--xla_cpu_no_such_switch=1", "(none)"]
  assert all(r["family"] == "dit" for r in rows)
  first, unknown, last = rows
  # The yardstick is the mean of the two baselines.
  mean = (first["step_ms"] + last["step_ms"]) / 2
  for r in (first, last):
    assert r["compile_s"] > 0 and r["step_ms"] > 0, r
    assert abs(r["vs_baseline"] - mean / r["step_ms"]) < 1e-9, r
  assert "Unknown flag" in unknown["error"] and "no_such_switch" in unknown["error"], unknown
  assert "step_ms" not in unknown
  table = (tmp_path / "flags.md").read_text()
  assert table.startswith("| family | XLA flag |") and "error: Unknown flag" in table


def test_bench_flags_rejects_bad_arguments(tmp_path):
  run = bench_flags("--families=vlm", f"--out={tmp_path / 'x'}")
  assert run.returncode == 2 and "unknown --families ['vlm']" in run.stderr, run.stderr
  run = bench_flags("--xla_flags=fast_min_max", f"--out={tmp_path / 'x'}")
  assert run.returncode == 2 and "are not XLA flags" in run.stderr, run.stderr
  assert not list(tmp_path.iterdir())
