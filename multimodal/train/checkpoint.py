"""Checkpoints through orbax's CheckpointManager: the train state (params,
optimizer state, step) and a small JSON record of where the data stream is.
Saving is asynchronous, keeps the newest N, and restores with the shardings of
the current mesh, so a run can resume on a different device layout.

Every checkpoint also carries an integrity record (the JSON item
"integrity", finalized atomically with the rest): a checksum of every array,
computed on device (see fingerprint.py), and a digest of the data position. A
state holding NaN or inf is never written (`NonFiniteStateError`). `restore`
recomputes the checksums of what it read: a checkpoint cut short, with a file
missing, truncated or corrupted, is reported, set aside in
`<workdir>/checkpoints_unusable/` (moved, never deleted) and the newest valid
one is taken instead.

Why checksums of our own: orbax's OCDBT store checksums its b-tree nodes
(which also hold arrays of a few KiB inline) but not the chunks of larger
arrays, so bytes flipped in such a chunk restore silently as wrong values
(tests/test_checkpoint_integrity.py shows it).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from multimodal.parallel import distributed
from multimodal.train import fingerprint as fingerprint_lib


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read."""


class NonFiniteStateError(CheckpointError):
  """`save` was given a state holding NaN or inf: nothing was written."""

  def __init__(self, message: str, *, step: int, paths: list[str]):
    super().__init__(message)
    self.step, self.paths = step, paths


INTEGRITY_ITEM = "integrity"
INTEGRITY_FORMAT = "multimodal.checkpoint.integrity"
INTEGRITY_VERSION = 1
UNUSABLE_DIR = "checkpoints_unusable"  # Next to "checkpoints" in the workdir.
_ITEMS = ("state", "data", INTEGRITY_ITEM)


def manager(workdir: str, *, save_interval_steps: int = 1, keep: int = 2,
            read_only: bool = False) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  processes = None
  if jax.process_count() > 1:
    # Every process saves its shards jointly. Orbax's barriers then go through
    # the distributed runtime, not device collectives: it runs some from its
    # background thread, where a collective could pair up with a train
    # step's on another process. (Orbax cannot create the directory then.)
    processes = set(range(jax.process_count()))
    if not read_only:
      os.makedirs(directory, exist_ok=True)
  # A save cut short leaves "<step>.orbax-checkpoint-tmp": orbax never lists
  # it as a step, and removes it if that step is saved again.
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=keep,
      create=processes is None, enable_async_checkpointing=True,
      read_only=read_only, multiprocessing_options=ocp.options.MultiprocessingOptions(
          active_processes=processes))
  # Checkpoints written before the integrity item existed restore as well:
  # restore only asks for the items a checkpoint has.
  return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


# ---------------------------------------------------------------------------
# The integrity record.

def _digest(value) -> str:
  text = json.dumps(value, sort_keys=True,
                    default=lambda o: o.item() if hasattr(o, "item") else str(o))
  return hashlib.sha256(text.encode()).hexdigest()


def _make_record(step: int, state, sums: dict[str, str], data_position) -> dict:
  record = {
      "format": INTEGRITY_FORMAT, "version": INTEGRITY_VERSION,
      "checksum": "per array: two uint32 lanes, sum of fmix32(bits ^ "
                  "fmix32(index * 0x9E3779B1 + seed)), see fingerprint.fingerprint",
      "step": int(step),
      "arrays": {name: {"dtype": fingerprint_lib.dtype_str(x.dtype), "shape": list(x.shape),
                        "checksum": sums[name]}
                 for name, x in fingerprint_lib.named_leaves(state)},
      "data_sha256": _digest(data_position),
  }
  record["record_sha256"] = _digest(record)
  return record


class _Unusable(Exception):
  """This step's checkpoint is damaged; `reason` says how."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _count(items, noun: str) -> str:
  return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _brief(e: BaseException) -> str:
  """One line: the error and, if it wraps one, the error at its root."""

  def line(error):
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    for noise in (" See full TensorStore details", " [tensorstore_spec"):
      text = text.split(noise)[0]
    text = text.rstrip(".")
    if len(text) > 200:
      text = text[:200] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

  root, seen = e, {id(e)}
  while (root.__cause__ or root.__context__) is not None and len(seen) < 20:
    root = root.__cause__ or root.__context__
    if id(root) in seen:
      break
    seen.add(id(root))
  return line(e) if root is e else f"{line(e)}, from {line(root)}"


@contextlib.contextmanager
def _quiet_orbax_leftovers():
  """When one shard of a damaged checkpoint fails, orbax abandons the reads
  of the others, and each prints "Exception ignored in: <coroutine ...>"
  with a page of TensorStore spec once collected. The reason printed is
  enough: collect them here, silently."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if "_read_array_index" not in repr(unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def _step_dir(mngr, step: int) -> str:
  return os.path.join(os.fspath(mngr.directory), str(step))


# Items are read with their orbax handlers, not through mngr.restore: that
# ends with a barrier between processes, which a process whose read failed
# (a damaged shard shows only on the process that reads it) never reaches,
# leaving the others to time out. Here every process reaches _agree instead.

def _read_state(step_dir: str, target):
  handler = ocp.StandardCheckpointHandler()
  try:
    with _quiet_orbax_leftovers():
      return handler.restore(epath.Path(step_dir) / "state",
                             args=ocp.args.StandardRestore(target))
  finally:
    handler.close()


def _read_json(step_dir: str, item: str):
  return ocp.JsonCheckpointHandler().restore(
      epath.Path(step_dir) / item, args=ocp.args.JsonRestore())


def has_integrity_record(mngr, step: int | None) -> bool:
  """Whether checkpoint `step` was written with an integrity record (by this
  code, not by a version before records existed). False without a step."""
  return step is not None and os.path.isdir(
      os.path.join(_step_dir(mngr, step), INTEGRITY_ITEM))


def _read_record(mngr, step: int) -> dict | None:
  """The step's integrity record, or None for a checkpoint written before
  there were any. Raises _Unusable."""
  step_dir = _step_dir(mngr, step)
  if not os.path.isdir(os.path.join(step_dir, INTEGRITY_ITEM)):
    # Written before integrity records, or damaged: orbax's own metadata
    # (written first, finalized with the rest) tells which items it had.
    try:
      with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
        items = json.load(f)["item_handlers"]
    except Exception as e:
      raise _Unusable("its integrity record is missing, and orbax's "
                      f"_CHECKPOINT_METADATA is unreadable ({_brief(e)})") from e
    if INTEGRITY_ITEM in items:
      raise _Unusable(f"its integrity record ({INTEGRITY_ITEM}/) is missing")
    return None
  try:
    record = _read_json(step_dir, INTEGRITY_ITEM)
  except Exception as e:
    raise _Unusable(f"its integrity record is unreadable ({_brief(e)})") from e
  if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
    raise _Unusable("its integrity record is not one (wrong format)")
  claimed = record.get("record_sha256")
  if claimed != _digest({k: v for k, v in record.items() if k != "record_sha256"}):
    raise _Unusable("its integrity record is corrupt (its own digest does not match)")
  if record.get("version") != INTEGRITY_VERSION:
    raise CheckpointError(
        f"checkpoint step {step} in {mngr.directory} has an integrity record of "
        f"version {record.get('version')}; this code reads version "
        f"{INTEGRITY_VERSION}. Restore it with the code that wrote it.")
  if record.get("step") != step:
    raise _Unusable(f"its integrity record is that of step {record.get('step')}")
  return record


def _restore_target(mngr, step: int, abstract_state, record):
  """(abstract tree to restore, {path: dtype wanted}) after checking the
  record's arrays against the state asked for. A checkpoint of another
  structure is not damaged: it raises CheckpointError (nothing set aside)."""
  if record is None:
    return abstract_state, {}
  stored = record["arrays"]
  wanted = {name: x for name, x in fingerprint_lib.named_leaves(abstract_state)}
  missing = sorted(set(wanted) - set(stored))
  extra = sorted(set(stored) - set(wanted))
  reshaped = sorted(name for name in set(wanted) & set(stored)
                    if list(wanted[name].shape) != list(stored[name]["shape"]))
  if missing or extra or reshaped:
    what = []
    if missing:
      what.append(f"{_count(missing, 'array')} of the state not in it "
                  f"(e.g. {missing[0]})")
    if extra:
      what.append(f"{_count(extra, 'array')} in it not in the state "
                  f"(e.g. {extra[0]})")
    if reshaped:
      name = reshaped[0]
      what.append(f"{_count(reshaped, 'array')} of another shape (e.g. {name}: "
                  f"{tuple(stored[name]['shape'])} saved, "
                  f"{tuple(wanted[name].shape)} wanted)")
    raise CheckpointError(
        f"checkpoint step {step} in {mngr.directory} does not match the state "
        f"being restored: {'; '.join(what)}. If the model config changed, "
        "restore with the config saved in the workdir.")
  # Other dtypes: read what was saved, verify it, then cast (as orbax would).
  casts = {name: x.dtype for name, x in wanted.items()
           if fingerprint_lib.dtype_str(x.dtype) != stored[name]["dtype"]}
  for name in casts:
    if (jax.dtypes.issubdtype(casts[name], jax.dtypes.prng_key)
        or "key<" in stored[name]["dtype"]):
      raise CheckpointError(
          f"checkpoint step {step} in {mngr.directory} holds {name} as "
          f"{stored[name]['dtype']}, the state wants {wanted[name].dtype}.")
  if not casts:
    return abstract_state, {}

  def as_saved(name, x):
    if name not in casts:
      return x
    return jax.ShapeDtypeStruct(x.shape, jnp.dtype(stored[name]["dtype"]),
                                sharding=getattr(x, "sharding", None))

  return fingerprint_lib.map_named(as_saved, abstract_state), casts


def _agree(code: int) -> int:
  """The largest of every process's `code`: one decision for all of them."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


_OK, _DAMAGED, _MISMATCH = 0, 1, 2


def _restore_step(mngr, step: int, abstract_state):
  """(state, data_position, verified) of `step`, checked against its
  integrity record. Raises _Unusable (damaged) or CheckpointError."""
  code, problem = _OK, None
  try:
    record = _read_record(mngr, step)
    target, casts = _restore_target(mngr, step, abstract_state, record)
    try:
      step_dir = _step_dir(mngr, step)
      restored = {"state": _read_state(step_dir, target),
                  "data": _read_json(step_dir, "data")}
    except Exception as e:  # orbax raises many types; all mean "unreadable".
      raise _Unusable(f"orbax could not read it ({_brief(e)})") from e
    if record is not None and _digest(restored["data"]) != record["data_sha256"]:
      raise _Unusable("its data position does not match its integrity record")
  except _Unusable as e:
    code, problem = _DAMAGED, e
  except CheckpointError as e:
    code, problem = _MISMATCH, e
  # Every process reads the same files, but a shard's damage may only show
  # on the process that reads it.
  agreed = _agree(code)
  if agreed == _MISMATCH:
    raise problem if code == _MISMATCH else CheckpointError(
        f"checkpoint step {step} in {mngr.directory} does not match the state "
        "being restored (see another process's log).")
  if agreed == _DAMAGED:
    raise problem if code == _DAMAGED else _Unusable(
        "another process could not read it (see its log)")
  sums, nonfinite = fingerprint_lib.summarize(restored["state"])  # A collective: all take part.
  if record is None:
    if nonfinite:
      raise _Unusable(f"it holds NaN or inf in {_count(nonfinite, 'array')} "
                      f"(e.g. {nonfinite[0]})")
  else:
    stored = record["arrays"]
    wrong = [name for name in stored if sums.get(name) != stored[name]["checksum"]]
    if wrong:
      raise _Unusable(
          f"{len(wrong)} of its {_count(stored, 'array')} do not match the checksums "
          f"recorded when it was saved ({', '.join(wrong[:3])}"
          f"{', ...' if len(wrong) > 3 else ''})")
  state = restored["state"]
  if casts:
    state = fingerprint_lib.map_named(
        lambda name, x: x.astype(casts[name]) if name in casts else x, state)
  return state, restored["data"], record is not None


def _is_read_only(mngr) -> bool:
  options = getattr(mngr, "_options", None)
  return getattr(options, "read_only", True) if options is not None else True


def _set_aside(mngr, steps: list[int]) -> None:
  """Moves the folders of damaged `steps` to <workdir>/checkpoints_unusable/
  (never deletes them), so that orbax no longer counts them: neither as the
  latest step nor when it keeps the newest N."""
  directory = os.fspath(mngr.directory)
  if _is_read_only(mngr):
    print(f"Left unusable checkpoint steps {steps} in {directory} "
          "(read-only: nothing moved).", file=sys.stderr)
    return
  unusable = os.path.join(os.path.dirname(directory), UNUSABLE_DIR)
  failed = None
  if jax.process_index() == 0:
    for step in steps:
      target = os.path.join(unusable, str(step))
      n = 1
      while os.path.exists(target):
        target = os.path.join(unusable, f"{step}.{n}")
        n += 1
      try:
        os.makedirs(unusable, exist_ok=True)
        os.rename(_step_dir(mngr, step), target)
      except OSError as e:
        failed = (step, e)
        break
      print(f"Moved unusable checkpoint step {step} to {target} (kept, not deleted).", file=sys.stderr)
  # Through the coordination service: a device collective here could be the
  # run's first, whose gloo context gives up on a process 30 s behind.
  distributed.wait_for_all("multimodal.train.checkpoint._set_aside")
  mngr.reload()
  if _agree(int(failed is not None)):
    where = f" ({_brief(failed[1])})" if failed else ""
    raise CheckpointError(
        f"could not move unusable checkpoint step {failed[0] if failed else '?'} "
        f"out of {directory}{where}. Move it away by hand (e.g. to {unusable}/) "
        "and rerun: orbax would otherwise keep counting it as a checkpoint.")


# ---------------------------------------------------------------------------
# Save and restore.

def save(mngr: ocp.CheckpointManager, step: int, state, data_position: dict,
         *, force: bool = False) -> bool:
  """Saves `state` and `data_position` as `step` if the manager's interval
  says so (or `force`), asynchronously; returns whether it started a save.

  The checksums of every array are computed first (on device); a state with
  NaN or inf in any floating array raises NonFiniteStateError and nothing is
  written.
  """
  if not (force or mngr.should_save(step)):
    return False
  sums, nonfinite = fingerprint_lib.summarize(state)
  if nonfinite:
    last = mngr.latest_step()
    kept = (f"the last checkpoint, step {last}, is kept" if last is not None
            else "there is no earlier checkpoint")
    shown = ", ".join(nonfinite[:5]) + (", ..." if len(nonfinite) > 5 else "")
    raise NonFiniteStateError(
        f"not saving checkpoint step {step} in {mngr.directory}: "
        f"NaN or inf in {_count(nonfinite, 'array')} of the state ({shown}). "
        f"Nothing was written for step {step}; {kept}.",
        step=step, paths=nonfinite)
  record = _make_record(step, state, sums, data_position)
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position),
      **{INTEGRITY_ITEM: ocp.args.JsonSave(record)}), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores (state, data_position) of `step` (default: the newest usable
  one), verified against the checksums saved with it; see
  restore_with_step."""
  state, data_position, _ = restore_with_step(mngr, abstract_state, step)
  return state, data_position


def restore_with_step(mngr: ocp.CheckpointManager, abstract_state,
                      step: int | None = None):
  """Returns (state, data_position, step restored).

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: orbax
  places every restored array straight onto its shard.

  With `step=None`, tries the steps newest first. One that cannot be read,
  has a file missing or damaged, or whose arrays do not match the checksums
  recorded at save time is reported (a printed line with the step, directory
  and reason) and skipped; once an older step restores, the skipped ones are
  moved to <workdir>/checkpoints_unusable/ (unless the manager is read-only),
  so that orbax neither resumes from them nor counts them among the kept.
  If none is usable, raises CheckpointError listing them, and moves nothing.
  An explicit `step` restores that step or raises CheckpointError.
  A checkpoint of another state structure raises CheckpointError at once.
  Checkpoints written before integrity records restore with a printed
  warning that they are unverified (a NaN in them still makes them unusable).
  """
  directory = mngr.directory
  mngr.wait_until_finished()
  if step is not None:
    if step not in mngr.all_steps():
      raise CheckpointError(
          f"no checkpoint step {step} in {directory} (it has steps "
          f"{list(mngr.all_steps())}).")
    try:
      state, data_position, verified = _restore_step(mngr, step, abstract_state)
    except _Unusable as e:
      raise CheckpointError(
          f"checkpoint step {step} in {directory} is unusable: {e.reason}. "
          "Nothing was moved or deleted; restore without a step to take the "
          "newest usable one.") from e
    _report_taken(directory, step, verified, skipped=[])
    return state, data_position, step

  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory}.")
  skipped: list[tuple[int, str]] = []
  for candidate in steps:
    try:
      state, data_position, verified = _restore_step(mngr, candidate, abstract_state)
    except _Unusable as e:
      print(f"Checkpoint step {candidate} in {directory} is unusable: {e.reason}.", file=sys.stderr)
      skipped.append((candidate, e.reason))
      continue
    if skipped:
      _set_aside(mngr, [s for s, _ in skipped])
    _report_taken(directory, candidate, verified, skipped=[s for s, _ in skipped])
    return state, data_position, candidate
  listing = "\n".join(f"  step {s}: {reason}" for s, reason in skipped)
  raise CheckpointError(
      f"no usable checkpoint in {directory}:\n{listing}\nNothing was moved or "
      f"deleted. To start the run over, move {directory} away (or pass a "
      "different --workdir); if the model config changed since they were "
      "written, restore with the config saved in the workdir.")


def _report_taken(directory, step: int, verified: bool, skipped: list[int]) -> None:
  instead = (f" instead of the unusable newer step{'s' if len(skipped) > 1 else ''} "
             f"{', '.join(map(str, skipped))}" if skipped else "")
  if verified:
    print(f"Restored checkpoint step {step} of {directory}{instead} "
          "(checksums verified).", file=sys.stderr)
  else:
    print(f"Warning: restored checkpoint step {step} of {directory}{instead} "
          "unverified: it was written before checkpoints carried checksums.", file=sys.stderr)


def abstract_like(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
