"""Measuring speed and memory for the benchmark harness (experiments/bench.py).

Times are wall-clock medians after warm-up: the median ignores the odd step
that a background process or the allocator slows down, which a mean would
not. Peak host memory is the process's resident high-water mark (Linux's
VmHWM), reset before each benchmark so that each row reports its own peak.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# The matmul sizes the peak is measured on: XLA's CPU dot reaches its best
# speed on the larger ones; the best of all is the peak.
PEAK_MATMUL_SIZES = (512, 1024, 2048)


def block(value: Any) -> Any:
  """Waits for every array in `value` (a pytree) to be computed."""
  return jax.block_until_ready(value)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """The median wall time of `fn()` over `repeats` calls after `warmup`
  untimed ones (compilation, first-call allocation). `fn` must block until
  its work is done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compile_seconds(jitted, *args) -> tuple[Any, float]:
  """(compiled executable, seconds to lower and compile it) for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def matmul_peak_flops(sizes=PEAK_MATMUL_SIZES, repeats: int = 5) -> dict:
  """The f32 matmul throughput this machine reaches under XLA, measured now.

  MFU is a fraction of this number rather than of a datasheet peak: on a
  CPU the datasheet (cores x FMA units x clock) is rarely reached by any
  library, and the clock depends on the load. Returns {"flops_per_s",
  "size"}: the best square size and its FLOP/s."""
  best = {"flops_per_s": 0.0, "size": None}
  matmul = jax.jit(jnp.matmul)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    seconds = median_seconds(lambda: block(matmul(a, b)), repeats, warmup=2)
    flops = 2 * n ** 3 / seconds
    if flops > best["flops_per_s"]:
      best = {"flops_per_s": flops, "size": n}
  return best


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def reset_peak_memory() -> None:
  """Starts a new high-water mark of resident memory (Linux: writing 5 to
  /proc/self/clear_refs resets VmHWM to the current RSS). Elsewhere the
  peak stays the process's lifetime peak."""
  with contextlib.suppress(OSError):
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")


def peak_memory_mib() -> float:
  """Resident high-water mark since the last reset_peak_memory(), in MiB."""
  kib = _status_kib("VmHWM")
  if kib is None:  # Not Linux: the lifetime peak (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = peak // 1024 if sys.platform == "darwin" else peak
  return kib / 1024


# XLA's CPU thunk executor names each op's events after its HLO instruction
# ("ynn_fusion.12", "multiply_tanh_fusion.3"); the kind is the name without
# the number. Wrapper events around whole programs are left out.
_WRAPPER_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def trace_op_times(trace_dir: str, steps: int) -> dict:
  """Per-step milliseconds of each XLA op kind in a jax.profiler trace of
  `steps` steps, summed over the runtime's threads, largest first; the key
  "all ops" is their sum. On a CPU, matmul fusions (ynn_fusion, dot) against
  the rest shows whether a step is bound by compute or by elementwise work."""
  import collections
  import glob
  import re

  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    return {}
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  totals = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):  # XLA's own threads only.
        continue
      for event in line.events:
        name = names.get(event.metadata_id, "")
        if name and not name.startswith(_WRAPPER_EVENTS):
          totals[re.sub(r"\.\d+$", "", name)] += event.duration_ps / 1e9 / steps
  ordered = dict(totals.most_common())
  return {"all ops": sum(ordered.values()), **ordered}
