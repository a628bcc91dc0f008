"""`./launch.sh bench` in its smoke mode (one tiny shape per row, on the
test suite's tiny world): every row of every family runs, with its peer,
and the table is written as JSON and markdown. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

EXPECTED_ROWS = (
    "matmul peak", "clip train step", "clip input pipeline",
    "clip train step, last blocks on the pooled tokens only", "clip train loop, 3 steps, batches prefetched",
    "clip train loop, 3 steps, metrics fetched every", "clip eval image encoder",
    "clip zero-shot eval", "dit train step", "dit input pipeline", "dit train step, two unrolled microbatches",
    "dit train step, freed memory kept by malloc", "dit DDIM sampler",
    "dit DDIM sampler",  # ..., the model on 8 rows at a time (before/after).
    "vlm train step", "vlm input pipeline",
    "vlm decode mu, batch 2, prompt 8, 4 new", "vlm decode mu, batch 2, prompt 8, 8 new")
# Rows without a PyTorch peer or an earlier version of our code beside them.
PEERLESS = ("clip zero-shot eval", "vlm train step")


def test_bench_smoke(data_dir, tmp_path):
  out = tmp_path / "bench"
  run = subprocess.run([sys.executable, "-m", "experiments.bench", "--smoke",
                        f"--data_dir={data_dir}", f"--out={out}", f"--profile={tmp_path / 'prof'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  assert "jax" in report["machine"] and "torch" in report["machine"]["peers"]
  rows = report["rows"]
  assert len(rows) == len(EXPECTED_ROWS)
  for row, name in zip(rows, EXPECTED_ROWS):
    assert row["benchmark"].startswith(name), (row, name)
    assert row["ours"] > 0, row
    if name not in PEERLESS:
      assert row["peer"] > 0 and row["ours_over_peer"] == row["ours"] / row["peer"], row
  steps = [r for r in rows if r["benchmark"].endswith("train step")]
  assert len(steps) == 3
  for row in steps:
    assert row["compile_s"] > 0 and row["step_ms"] > 0 and row["peak_mib"] > 0
    assert row["model_gflop"] > 0 and 0 < row["mfu"]
  # A before/after row sets the step as it runs now beside the step with
  # the change undone.
  for change in ("two unrolled microbatches", "last blocks on the pooled tokens only"):
    row = next(r for r in rows if r["benchmark"].endswith(change))
    assert row["peer_name"].startswith("before: ") and row["before_peak_mib"] > 0, row
    after = next(r for r in steps if row["benchmark"].startswith(r["benchmark"]))
    assert row["ours"] == after["ours"], (row, after)
  # The sampler's own before/after row: its model calls in microbatches.
  sampler, parts = (r for r in rows if r["benchmark"].startswith("dit DDIM sampler"))
  assert parts["benchmark"] == sampler["benchmark"] + ", the model on 8 rows at a time", parts
  assert parts["ours"] == sampler["ours"] and parts["peer_name"].startswith("before: "), parts
  # The step in two fresh processes: with this environment's GLIBC_TUNABLES
  # (launch.sh's malloc tunables) and with glibc's defaults.
  row = next(r for r in rows if r["benchmark"] == "dit train step, freed memory kept by malloc")
  assert row["peer_name"] == "before: glibc's default malloc", row
  assert row["step_ms"] > 0 and row["page_faults_per_step"] >= 0, row
  assert row["before_page_faults_per_step"] >= 0, row
  assert row["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", ""), row
  # The frozen tower's backward is not counted, as it is not run: the VLM's
  # FLOPs are under MaxText's 3 x forward, and over 1 x.
  vlm_step = next(r for r in steps if r["benchmark"] == "vlm train step")
  convention = vlm_step["convention_gflop"]
  assert convention / 3 < vlm_step["model_gflop"] < convention, vlm_step
  # Each of our timed rows left a jax.profiler trace for TensorBoard.
  traces = {p.parent.parent.parent.parent.name for p in (tmp_path / "prof").rglob("*.xplane.pb")}
  assert {"clip_train_step", "dit_train_step", "dit_sampler", "vlm_train_step"} <= traces, traces
  # ... summed by XLA op kind: the parts add up to the whole.
  for row in steps:
    profile = row["profile_ms"]
    kinds = [v for k, v in profile.items() if k != "all ops"]
    assert profile["all ops"] > 0 and 0 < sum(kinds) <= profile["all ops"] + 0.1, profile
  table = (tmp_path / "bench.md").read_text()
  assert table.startswith("| benchmark |") and "| clip train step |" in table


def test_bench_unknown_family(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.bench", "--families=vit",
                        f"--out={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2 and "unknown --families" in run.stderr
