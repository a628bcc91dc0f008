"""What `./launch.sh bench` measures, family by family: each function returns
rows (dicts) of the table experiments/bench.py prints.

Our rows run the real code paths: the trainer's jitted train step
(trainer.make_train_step, buffers donated as in training) on a batch from
the task's own input pipeline, the task's sampler, the zero-shot evaluator's
image encoder, the decoder's cached generation. Each peer runs the same
shapes, batch and precision in PyTorch (experiments/bench_peers.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax

from experiments import bench_peers, bench_process
from multimodal import tasks
from multimodal.data import pipeline
from multimodal.parallel import sharding
from multimodal.perf import flops, measure
from multimodal.train import trainer

# Batches the input-pipeline rows read after their warm-up.
PIPELINE_BATCHES = 20


@dataclasses.dataclass
class Settings:
  repeats: int              # Timed runs per row; the median is reported.
  peak_flops: float         # The measured f32 matmul peak, FLOP/s.
  profile_dir: str | None   # Where jax.profiler traces go, or None.
  smoke: bool               # One tiny shape per row (the test suite's mode).


def row(benchmark: str, unit: str, ours: float, *, seconds: float | None = None,
        compile_s: float | None = None, model_flops: float | None = None,
        settings: Settings | None = None, peak_mib: float | None = None,
        peer_name: str | None = None, peer: float | None = None, **extra) -> dict:
  """One line of the table. `ours`/`peer` are throughputs in `unit` (more
  is better), so ours/peer > 1 means we are faster."""
  out = {"benchmark": benchmark, "unit": unit, "ours": ours}
  if seconds is not None:
    out["step_ms"] = 1e3 * seconds
  if compile_s is not None:
    out["compile_s"] = compile_s
  if model_flops is not None:
    out["model_gflop"] = model_flops / 1e9
    if seconds and settings:
      out["mfu"] = model_flops / seconds / settings.peak_flops
  if peak_mib is not None:
    out["peak_mib"] = peak_mib
  if peer_name is not None:
    out["peer_name"] = peer_name
    out["peer"] = peer
    out["ours_over_peer"] = ours / peer if peer else None
  out.update(extra)
  return out


# Steps (or calls) each --profile trace records.
PROFILED_STEPS = 3
# The op kinds a row's profile summary keeps (the largest).
PROFILE_TOP = 8


@contextlib.contextmanager
def maybe_profile(settings: Settings, name: str, summary: dict):
  """A jax.profiler trace of the block (PROFILED_STEPS calls) into
  PROFILE_DIR/name, if asked; `summary` then receives the per-call
  milliseconds of the largest XLA op kinds (measure.trace_op_times)."""
  if not settings.profile_dir:
    yield
    return
  path = os.path.join(settings.profile_dir, name)
  with jax.profiler.trace(path):
    yield
  times = measure.trace_op_times(path, PROFILED_STEPS)
  summary["profile_ms"] = {k: round(v, 2) for k, v in list(times.items())[:PROFILE_TOP + 1]}


class StepBench:
  """A task's compiled train step on one fixed batch from its pipeline.

  Built the way trainer._train builds it (mesh, sharded init, donated
  state), minus checkpoints and pretrained weights: speed does not depend on
  the values of the weights."""

  def __init__(self, config):
    self.config = config
    self.task = tasks.get(config.task)(config)
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_size = config.input.batch_size
    with sharding.mesh_context(self.mesh):
      init_fn, shardings, tx, schedule = trainer.create_train_state(
          self.task, config, self.mesh, total_steps=1000)
      self.state = init_fn()
      self.step_fn = trainer.make_train_step(
          self.task, config, tx, schedule, shardings, self.mesh)
    self.batch = next(self.global_batches())

  def dataset(self):
    return self.task.train_dataset(
        local_batch_size=self.batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        shards=pipeline.Shards.of(sharding.batch_sharding(self.mesh)))

  def global_batches(self):
    return pipeline.iterate_global(self.dataset(), sharding.batch_sharding(self.mesh),
                                   what=self.config.input.data)

  def time_steps(self, settings: Settings, name: str, summary: dict) -> tuple[float, float]:
    """(compile seconds, median step seconds); a profile summary, if asked,
    goes into `summary`."""
    with sharding.mesh_context(self.mesh):
      compiled, compile_s = measure.compile_seconds(self.step_fn, self.state, self.batch)

      def step():
        self.state, metrics = compiled(self.state, self.batch)
        measure.block((self.state, metrics))

      _, seconds, profile = timed_and_profiled(step, 1, settings, name, warmup=2)
    summary.update(profile)
    return compile_s, seconds

  def model_flops(self) -> dict:
    """{"model_flops"}: MaxText's convention, 3 x the forward matmuls. With
    frozen parameters the step skips part of the backward that the
    convention counts (optim.without_frozen_gradients), so then the matmuls
    of the traced step, and the convention's count as "convention_gflop"."""
    convention = flops.train_step_flops(self.config)
    if not self.config.get("freeze"):
      return {"model_flops": convention}
    traced = flops.jaxpr_matmul_flops(self.step_fn, self.state, self.batch)
    return {"model_flops": float(traced), "convention_gflop": convention / 1e9}

  def pipeline_examples_per_s(self) -> float:
    """The training input pipeline alone (read, decode, pp, batch), on the
    host, without the devices: what the trainer could at most consume."""
    batches = self.dataset().as_numpy_iterator()
    next(batches)  # Warm-up: file opening, shuffle buffer fill.
    start = time.perf_counter()
    for _ in range(PIPELINE_BATCHES):
      next(batches)
    return PIPELINE_BATCHES * self.batch_size / (time.perf_counter() - start)


def train_rows(name: str, config, settings: Settings, peer_name: str | None = None,
               peer_factory=None) -> tuple[list[dict], StepBench]:
  """The train-step row (with its peer, from `peer_factory(step_bench)`),
  and the input-pipeline row."""
  measure.reset_peak_memory()
  bench = StepBench(config)
  profile = {}
  compile_s, seconds = bench.time_steps(settings, f"{name}_train_step", profile)
  peak = measure.peak_memory_mib()
  consumed = bench.batch_size / seconds
  peer = None
  if peer_factory is not None and bench_peers.available():
    peer_step = peer_factory(bench)
    peer = bench.batch_size / measure.median_seconds(peer_step, settings.repeats, warmup=2)
  step_row = row(f"{name} train step", "examples/s", consumed, seconds=seconds,
                 compile_s=compile_s, **bench.model_flops(),
                 settings=settings, peak_mib=peak,
                 peer_name=peer_name if peer_factory is not None else None, peer=peer,
                 **profile)
  supplied = bench.pipeline_examples_per_s()
  # The pipeline's "peer" is the train step it feeds: the ratio says how
  # many times over the input keeps up with training.
  pipeline_row = row(f"{name} input pipeline", "examples/s", supplied,
                     peer_name=f"{name} train step consumes", peer=consumed)
  return [step_row, pipeline_row], bench


def before_row(change: str, after: dict, config, settings: Settings, *,
               config_before: dict) -> dict:
  """A config option's before/after row: the train step as it runs now
  (`after`, a train_rows step row) beside the step with the config values
  `config_before` (dotted keys), which turn the option off. The "peer" is
  the step without it, so ours/peer is the option's speed-up; peak memory
  is reported for both. (A change of code, not of an option, is measured
  by running the bench at the revision before it.)"""
  undone = dict(config_before)
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(config_before)
  measure.reset_peak_memory()
  before = StepBench(config)
  _, seconds = before.time_steps(dataclasses.replace(settings, profile_dir=None), "", {})
  return row(f"{after['benchmark']}, {change}", "examples/s", after["ours"],
             seconds=after["step_ms"] / 1e3, peak_mib=after["peak_mib"],
             peer_name="before: " + ", ".join(f"{k}={v}" for k, v in undone.items()),
             peer=before.batch_size / seconds, before_peak_mib=measure.peak_memory_mib())


def allocator_row(family: str, batch_size: int, settings: Settings,
                  data_dir: str | None) -> dict:
  """The train step in two fresh processes (the C library reads its
  tunables once, at start-up): with this process's environment, which
  launch.sh gives its malloc tunables, and with GLIBC_TUNABLES unset, as
  glibc's defaults. Each process also counts the page faults of one step."""
  without = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  repeats = settings.repeats
  now, before = (bench_process.in_fresh_process(family, env, repeats, settings.smoke, data_dir)
                 for env in (dict(os.environ), without))
  for result in (now, before):
    if "error" in result:
      raise RuntimeError(f"the {family} step in a fresh process failed: {result['error']}")
  return row(f"{family} train step, freed memory kept by malloc", "examples/s",
             1e3 * batch_size / now["step_ms"], seconds=now["step_ms"] / 1e3,
             peer_name="before: glibc's default malloc",
             peer=1e3 * batch_size / before["step_ms"],
             page_faults_per_step=now["page_faults_per_step"],
             before_page_faults_per_step=before["page_faults_per_step"],
             glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def loop_rows(name: str, bench: StepBench, settings: Settings, steps: int) -> list[dict]:
  """Two before/after rows of the training loop around the step, `steps`
  steps on the pipeline's batches as trainer.train runs them: batches moved
  to the devices by a background thread (pipeline.iterate_global), not read
  in the loop; metrics fetched to the host every config.log_steps steps,
  not after every step (a fetch waits for the step, so the host cannot
  queue the next one meanwhile)."""
  log_steps = bench.config.get("log_steps", 50)

  def examples_per_s(prefetch: bool, fetch_every: int) -> float:
    if prefetch:
      batches = bench.global_batches()
    else:
      shard = sharding.batch_sharding(bench.mesh)
      batches = (pipeline.to_global_arrays(b, shard)
                 for b in bench.dataset().as_numpy_iterator())
    # Warm-up: file opening, shuffle buffer fill, the jit's own compile.
    with sharding.mesh_context(bench.mesh):
      bench.state, metrics = bench.step_fn(bench.state, next(batches))
      measure.block((bench.state, metrics))

    def loop():
      metrics = None
      for i in range(steps):
        bench.state, metrics = bench.step_fn(bench.state, next(batches))
        if (i + 1) % fetch_every == 0:
          jax.device_get(metrics)
      measure.block((bench.state, metrics))

    with sharding.mesh_context(bench.mesh):
      seconds = measure.median_seconds(loop, min(settings.repeats, 3), warmup=0)
    if hasattr(batches, "close"):
      batches.close()  # Stops iterate_global's thread.
    return steps * bench.batch_size / seconds

  after = examples_per_s(prefetch=True, fetch_every=log_steps)
  loop = f"{name} train loop, {steps} steps"
  return [row(f"{loop}, batches prefetched by a thread", "examples/s", after,
              peer_name="before: read in the loop",
              peer=examples_per_s(prefetch=False, fetch_every=log_steps)),
          row(f"{loop}, metrics fetched every {log_steps} steps", "examples/s", after,
              peer_name="before: every step",
              peer=examples_per_s(prefetch=True, fetch_every=1))]


def median_throughput(fn, count: int, settings: Settings) -> tuple[float, float]:
  """(items per second, median seconds) of `fn`, which does `count` items."""
  seconds = measure.median_seconds(fn, settings.repeats, warmup=1)
  return count / seconds, seconds


def timed_and_profiled(fn, count: int, settings: Settings, name: str,
                       warmup: int = 1) -> tuple[float, float, dict]:
  """(items per second, median seconds, profile summary) of `fn`, which
  does `count` items: timed first, then (if asked) traced as `name`."""
  seconds = measure.median_seconds(fn, settings.repeats, warmup=warmup)
  profile = {}
  with maybe_profile(settings, name, profile):
    for _ in range(PROFILED_STEPS):
      fn()
  return count / seconds, seconds, profile


def peer_throughput(factory, count: int, settings: Settings) -> float | None:
  """Items per second of the PyTorch peer `factory()` builds (its callable
  does `count` items), or None without torch."""
  if not bench_peers.available():
    return None
  return count / measure.median_seconds(factory(), settings.repeats, warmup=1)
