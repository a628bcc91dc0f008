"""Preemption: SIGTERM or SIGINT asks a run to checkpoint and exit cleanly.

Schedulers (SLURM, Kubernetes, preemptible TPU VMs) send SIGTERM some time
before they kill a job; Ctrl-C sends SIGINT. Either one only sets a flag: the
trainer finishes the step in flight, saves a checkpoint at that step and
exits with PREEMPTED_EXIT_CODE, and the same command resumes from there.

With several processes every one must stop at the same step (the save is a
collective), so there the decision goes through JAX's preemption sync point:
the coordination service learns of a SIGTERM delivered to any process and all
of them agree on the step at which to stop. SIGINT keeps its default meaning
there (an interactive Ctrl-C reaches one process only).
"""
from __future__ import annotations

import signal
import threading

import jax

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to
# retry". Job scripts requeue on it (e.g. `[ $? -eq 75 ] && scontrol requeue`).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped on a signal."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    self.step, self.signal_name = step, signal_name
    super().__init__(
        f"{signal_name} received: saved a checkpoint at step {step} in "
        f"{checkpoint_dir} and stopped (exit code {PREEMPTED_EXIT_CODE}). Rerun "
        "the same command to resume from it.")


class StopRequests:
  """A context manager that turns SIGTERM/SIGINT into a polled flag.

  The first signal is recorded; a second SIGINT raises KeyboardInterrupt at
  once, for a user who does not want to wait for the checkpoint.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> "StopRequests":
    # Signals can only be handled in the main thread (tests and notebooks
    # may call train() from another one: they then keep the default).
    if threading.current_thread() is threading.main_thread():
      signals = () if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    print(f"\n{self.signal_name} received: finishing this step, then saving a "
          "checkpoint and stopping.", flush=True)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if self._multiprocess:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None
