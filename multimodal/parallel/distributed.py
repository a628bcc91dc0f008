"""Multi-host start-up: one `jax.distributed.initialize` call, set up from the
environment, before anything else touches JAX.

Where the process topology comes from, first match wins:

  MM_COORDINATOR=host:port  MM_NUM_PROCESSES=N  MM_PROCESS_ID=i
      explicit (what `./launch.sh run --procs N` sets for its local copies);
  MM_DISTRIBUTED=off
      single process, whatever the environment says;
  MM_DISTRIBUTED=auto
      jax.distributed.initialize() with JAX's own cluster detection (what
      `./launch.sh run --tpu` sets on every TPU VM worker);
  SLURM, inside `srun` with SLURM_NTASKS > 1
      coordinator on the first node of the step; one task per node sees all
      of its GPUs, several tasks per node get one GPU each;
  a Cloud TPU VM (or GKE TPU) slice with more than one worker
      JAX's TPU detection (metadata server / TPU_WORKER_HOSTNAMES);
  otherwise
      a single process: nothing is initialised.

MM_INIT_TIMEOUT (default 300 s) bounds the wait for every process to join;
MM_HEARTBEAT_TIMEOUT (default 60 s) bounds how long the survivors of a dead
process wait before they stop with an error instead of hanging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import traceback
from collections.abc import Mapping

COORDINATOR = "MM_COORDINATOR"
NUM_PROCESSES = "MM_NUM_PROCESSES"
PROCESS_ID = "MM_PROCESS_ID"
MODE = "MM_DISTRIBUTED"
INIT_TIMEOUT = "MM_INIT_TIMEOUT"
HEARTBEAT_TIMEOUT = "MM_HEARTBEAT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 60

# The variables JAX's SLURM detection needs (jax/_src/clusters/slurm_cluster.py):
# all of them are set only inside an `srun` step, not in the batch script.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ValueError):
  """The environment asks for a multi-process job in an inconsistent way."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job. `kwargs` go to jax.distributed.initialize;
  `how` names the source in the start-up line."""
  how: str
  kwargs: dict | None = None  # None: a single process, nothing to initialise.
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def distributed(self) -> bool:
    return self.kwargs is not None


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
  value = env.get(name, "")
  try:
    number = int(value)
  except ValueError:
    number = None
  if number is None or number < minimum:
    raise DistributedError(f"{name}={value!r} must be an integer >= {minimum}.")
  return number


def _timeouts(env: Mapping[str, str]) -> dict:
  return dict(
      initialization_timeout=_int({INIT_TIMEOUT: str(DEFAULT_INIT_TIMEOUT), **env},
                                  INIT_TIMEOUT, 1),
      heartbeat_timeout_seconds=_int(
          {HEARTBEAT_TIMEOUT: str(DEFAULT_HEARTBEAT_TIMEOUT), **env},
          HEARTBEAT_TIMEOUT, 1))


def slurm_tasks_per_node(env: Mapping[str, str]) -> int:
  """Tasks on this node: SLURM_STEP_TASKS_PER_NODE looks like "8(x4)" or "2,1"."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
  match = re.match(r"\d+", spec)
  return int(match.group()) if match else 1


def _tpu_workers() -> int:
  """Workers of the Cloud TPU slice this VM belongs to (1 if not a TPU VM)."""
  try:
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return 1
    for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
      if cluster.is_env_present():
        return cluster.get_process_count()
  except Exception:  # noqa: BLE001 -- JAX internals moved, or no metadata server.
    pass
  return 1


def plan(env: Mapping[str, str] | None = None, tpu_workers=_tpu_workers) -> Plan:
  """Decides from `env` (default os.environ) how this process joins the job."""
  env = os.environ if env is None else env
  explicit = [name for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if env.get(name)]
  if explicit:
    if len(explicit) != 3:
      missing = sorted({COORDINATOR, NUM_PROCESSES, PROCESS_ID} - set(explicit))
      raise DistributedError(
          f"{', '.join(explicit)} is set but {', '.join(missing)} is not: "
          f"set all of {COORDINATOR}=host:port, {NUM_PROCESSES} and {PROCESS_ID}.")
    address = env[COORDINATOR]
    if not re.fullmatch(r"\S+:\d+", address):
      raise DistributedError(f"{COORDINATOR}={address!r} must be host:port.")
    count = _int(env, NUM_PROCESSES, 1)
    index = _int(env, PROCESS_ID, 0)
    if index >= count:
      raise DistributedError(
          f"{PROCESS_ID}={index} must be below {NUM_PROCESSES}={count}.")
    if count == 1:
      return Plan(how="single process")
    # No cluster detection: it would overwrite nothing here, but it would
    # restrict a SLURM task to one GPU.
    return Plan(how=f"{COORDINATOR}={address}", num_processes=count,
                process_id=index, kwargs=dict(
                    coordinator_address=address, num_processes=count,
                    process_id=index, cluster_detection_method="deactivate",
                    **_timeouts(env)))
  mode = env.get(MODE, "")
  if mode not in ("", "auto", "off"):
    raise DistributedError(f"{MODE}={mode!r} must be 'auto' or 'off'.")
  if mode == "off":
    return Plan(how="single process")
  if mode == "auto":
    return Plan(how="JAX cluster detection", kwargs=_timeouts(env))
  if all(env.get(name) for name in _SLURM_VARS) and _int(env, "SLURM_NTASKS", 1) > 1:
    count, index = _int(env, "SLURM_NTASKS", 1), _int(env, "SLURM_PROCID", 0)
    if slurm_tasks_per_node(env) > 1:
      # One task per GPU: JAX's detection also makes GPU SLURM_LOCALID the
      # task's only device.
      return Plan(how="SLURM (one task per GPU)", num_processes=count,
                  process_id=index,
                  kwargs=dict(cluster_detection_method="slurm", **_timeouts(env)))
    # One task per node: the coordinator JAX's detection would use, but every
    # GPU of the node stays visible (detection would keep only GPU 0).
    from jax._src.clusters import slurm_cluster
    address = slurm_cluster.SlurmCluster.get_coordinator_address(
        timeout_secs=None, override_coordinator_port=env.get("JAX_COORDINATOR_PORT"))
    return Plan(how=f"SLURM (coordinator {address})", num_processes=count,
                process_id=index, kwargs=dict(
                    coordinator_address=address, num_processes=count,
                    process_id=index, cluster_detection_method="deactivate",
                    **_timeouts(env)))
  if tpu_workers() > 1:
    return Plan(how="Cloud TPU slice", kwargs=_timeouts(env))
  return Plan(how="single process")


_initialized: Plan | None = None


def initialize(env: Mapping[str, str] | None = None) -> Plan:
  """Joins the multi-process job the environment describes, if any.

  Call once, at program start, before any JAX computation. Prints one line
  naming this process and the process count when there are several.
  """
  global _initialized
  if _initialized is not None:
    return _initialized
  chosen = plan(env)
  if chosen.distributed:
    import jax
    # CPU collectives across processes go through gloo (TCP); without it a
    # multi-process CPU job fails at its first cross-process computation.
    # GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(**chosen.kwargs)
    except Exception as e:  # noqa: BLE001 -- XLA raises several types.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DistributedError(
          f"could not join the multi-process job ({chosen.how}): {first}. Every "
          f"process must start within {INIT_TIMEOUT}="
          f"{chosen.kwargs['initialization_timeout']} s of the others and reach "
          "the coordinator's host and port.") from e
    state = jax._src.distributed.global_state  # No backend needed for these.
    chosen = dataclasses.replace(chosen, num_processes=state.num_processes,
                                 process_id=state.process_id)
    print(f"Process {chosen.process_id} of {chosen.num_processes} "
          f"(jax.distributed via {chosen.how}).", flush=True)
  _initialized = chosen
  return chosen


@contextlib.contextmanager
def leave_at_once_on_error(keep_exit_codes: tuple[int, ...] = ()):
  """Ends this process at once when the body fails, if it is one of several.

  A process that leaves through an exception or a non-zero exit normally runs
  jax.distributed's shutdown, a barrier that waits minutes for the processes
  still running, while they wait at their next collective for this one: an
  error in one process (its disk, its data) would hang the whole job. Instead
  it prints the error and calls os._exit, so the launcher (or the others'
  heartbeat) sees it gone and stops the rest. `keep_exit_codes` exit through
  the barrier as usual: codes every process reaches together, such as a
  preemption's after its joint checkpoint.
  """
  try:
    yield
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not _several_processes() or code == 0 or code in keep_exit_codes:
      raise
    if not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
    _exit_now(code)
  except BaseException:  # noqa: BLE001 -- any error, reported in full.
    if not _several_processes():
      raise
    traceback.print_exc()
    _exit_now(1)


def _several_processes() -> bool:
  return _initialized is not None and _initialized.distributed


def _exit_now(code: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def wait_for_all(name: str) -> None:
  """Waits until every process of the job reaches `name` (at most
  MM_INIT_TIMEOUT seconds). It meets through the coordination service, not
  the devices: a device collective's first use sets up its gloo context,
  which gives up after 30 s if a process lags behind, as one still starting
  up or compiling on a loaded host can. A no-op in a single process."""
  import jax
  # However the job was started (our initialize or jax.distributed's own).
  client = jax._src.distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return
  # Every process meets the same barriers in the same order; numbering them
  # makes each meeting's id new, so a name can be used more than once.
  _barriers_met[name] = _barriers_met.get(name, 0) + 1
  timeout_s = _timeouts(os.environ)["initialization_timeout"]
  client.wait_at_barrier(f"{name}#{_barriers_met[name]}", timeout_s * 1000)


_barriers_met: dict[str, int] = {}


def agree(text: str, max_bytes: int = 4096) -> str:
  """Process 0's `text` on every process (e.g. a generated workdir name)."""
  import jax
  if jax.process_count() == 1:
    return text
  import numpy as np
  from jax.experimental import multihost_utils
  data = text.encode()
  if len(data) > max_bytes:
    raise ValueError(f"agree: {len(data)} bytes is more than {max_bytes}.")
  buffer = np.zeros(max_bytes + 4, np.uint8)
  buffer[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
  buffer[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  size = int(np.frombuffer(shared[:4].tobytes(), np.uint32)[0])
  return shared[4:4 + size].tobytes().decode()
