"""launch.sh's malloc tunables: a jitted computation run again reuses the
memory it freed instead of page-faulting it in anew, and launch.sh exports
the tunables once, before any of the caller's."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

LAUNCH_SH = os.path.join(ROOT, "launch.sh")
OUTPUT_MIB = 64
PAGES = OUTPUT_MIB * 2**20 // 4096

# Doubles a 64 MiB array five times after a warm-up and prints the minor page
# faults per call: XLA allocates each call's output afresh.
FAULTS_PER_CALL = f"""
import resource
import jax
import jax.numpy as jnp
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones({OUTPUT_MIB} * 2**20 // 4)
double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  double(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def launch_sh_tunables() -> str:
  with open(LAUNCH_SH) as f:
    return re.search(r'^malloc_tunables="([^"]+)"$', f.read(), re.M).group(1)


def faults_per_call(glibc_tunables: str | None) -> float:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
  if glibc_tunables is not None:
    env["GLIBC_TUNABLES"] = glibc_tunables
  run = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return float(run.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
  # glibc's defaults give a block this large back to the kernel when it is
  # freed, so every call faults the whole output in again ...
  assert faults_per_call(None) > PAGES / 2
  # ... and launch.sh's tunables keep it in the process.
  assert faults_per_call(launch_sh_tunables()) < PAGES / 20


def exported_tunables(before: str | None) -> str:
  """GLIBC_TUNABLES after launch.sh's export block, run alone in bash."""
  with open(LAUNCH_SH) as f:
    block = re.search(r'^malloc_tunables=.*?^esac$', f.read(), re.M | re.S).group(0)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if before is not None:
    env["GLIBC_TUNABLES"] = before
  run = subprocess.run(["bash", "-c", f'{block}\nprintf %s "$GLIBC_TUNABLES"'], env=env,
                       capture_output=True, text=True, timeout=30)
  assert run.returncode == 0, run.stderr
  return run.stdout


def test_launch_sh_puts_its_tunables_before_the_callers_once():
  ours = launch_sh_tunables()
  assert exported_tunables(None) == ours
  # glibc applies tunables in order, so the caller's own setting wins.
  assert exported_tunables("glibc.malloc.hugetlb=0") == f"{ours}:glibc.malloc.hugetlb=0"
  # A launch.sh started by another (--procs, --slurm) adds nothing.
  assert exported_tunables(f"{ours}:glibc.malloc.hugetlb=0") == f"{ours}:glibc.malloc.hugetlb=0"
