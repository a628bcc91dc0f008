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
