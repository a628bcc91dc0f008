"""`./launch.sh bench` in its smoke mode (one tiny shape): it runs and writes
its table; no timing is asserted."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke(tmp_path):
  out = tmp_path / "bench"
  run = subprocess.run([sys.executable, "-m", "experiments.bench", "--smoke", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((tmp_path / "bench.json").read_text())
  assert [row["new_tokens"] for row in rows] == [4, 8]
  for row in rows:
    assert row["ours_ms_per_token"] > 0 and row["ours_tokens_per_s"] > 0
    assert row["peer_ms_per_token"] > 0  # transformers' LlamaForCausalLM.generate().
  assert "| decode mu" in (tmp_path / "bench.md").read_text()


def test_bench_unknown_family(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.bench", "--families=dit",
                        f"--out={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2 and "unknown --families" in run.stderr
