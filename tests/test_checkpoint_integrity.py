"""Damaged checkpoints (fault tolerance): a checkpoint cut short by a crash, or
with a file missing, truncated or corrupted, is detected; restore falls back
to the newest valid one, says which and why, never loads garbage and never
deletes anything; a NaN is never written into a checkpoint.

A small state (a few float32 arrays sharded over the 8-device mesh, an int32
step) goes straight through checkpoint.manager/save/restore; no training.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import killed_on_exit
from multimodal.train import checkpoint, fingerprint

# Orbax's reader leaves coroutines behind when a file it reads is damaged.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]), ("d",))


def _values(seed: int) -> dict:
  """Numpy values of the state at a step. `w` is big enough (256 KiB) for
  orbax to store its chunks outside the checksummed OCDBT b-tree nodes, and
  made of random bits (finite: exponent < 128) so zstd cannot shrink it."""
  rng = np.random.RandomState(seed)
  bits = rng.randint(0, 2**32, size=(256, 256), dtype=np.uint64).astype(np.uint32)
  return {"step": np.int32(seed),
          "params": {"w": (bits & np.uint32(0xBFFFFFFF)).view(np.float32),
                     "b": rng.randn(64).astype(np.float32),
                     "v": rng.randn(8, 16).astype(np.float32)}}


def _shardings(mesh) -> dict:
  return {"step": NamedSharding(mesh, P()),
          "params": {"w": NamedSharding(mesh, P("d")),
                     "b": NamedSharding(mesh, P()),
                     "v": NamedSharding(mesh, P(None, "d"))}}


def _state(mesh, seed: int, values=None) -> dict:
  return jax.tree.map(jax.device_put, values or _values(seed), _shardings(mesh))


def _abstract(mesh) -> dict:
  return checkpoint.abstract_like(_values(0), _shardings(mesh))


def _position(step: int) -> dict:
  return {"examples_per_process": 10 * step}


def _save(mesh, workdir, steps, keep: int = 3) -> None:
  mngr = checkpoint.manager(str(workdir), keep=keep)
  for step in steps:
    assert checkpoint.save(mngr, step, _state(mesh, step), _position(step))
  mngr.wait_until_finished()  # Every file written before any is damaged.
  mngr.close()


def _assert_state_is(state, seed: int) -> None:
  expected = _values(seed)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))


def _data_files(step_dir) -> list[str]:
  """The array data files orbax wrote for a step's state (OCDBT puts them
  under state/ocdbt.process_<i>/d/ and state/d/), largest first."""
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      found += [os.path.join(root, f) for f in files]
  return sorted(found, key=os.path.getsize, reverse=True)


def _flip_bytes(path, count: int = 16) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    for i in range(middle, middle + count):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _all_files(directory) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files)


# ---------------------------------------------------------------------------
# The checksum.

_MASK = 0xFFFFFFFF


def _np_fmix32(h):
  """murmur3 fmix32 in uint64 arithmetic, masked: no reliance on uint32
  wrap-around."""
  h = h & _MASK
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & _MASK
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & _MASK
  return h ^ (h >> 16)


def _np_checksum(x: np.ndarray) -> str:
  """The reference math of fingerprint.fingerprint for a 32-bit array: per
  lane, sum over the row-major elements of fmix32(bits ^ fmix32(index *
  0x9E3779B1 + seed)), mod 2**32."""
  bits = np.ascontiguousarray(x).view(np.uint32).ravel().astype(np.uint64)
  index = np.arange(bits.size, dtype=np.uint64)
  lanes = []
  for seed in (0x243F6A88, 0x85A308D3):
    mixed = _np_fmix32(bits ^ _np_fmix32(index * 0x9E3779B1 + seed))
    lanes.append(int(mixed.sum()) % 2**32)
  return "".join(f"{lane:08x}" for lane in lanes)


@pytest.mark.unit
def test_fingerprint_is_layout_independent_and_detects_changes(mesh):
  x = np.random.RandomState(0).randn(16, 8).astype(np.float32)
  layouts = [NamedSharding(mesh, P("d")), NamedSharding(mesh, P(None, "d")),
             NamedSharding(Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b")),
                           P("b", "a")),
             NamedSharding(mesh, P())]
  prints = [fingerprint.fingerprint({"p": {"x": jax.device_put(x, s)}}) for s in layouts]
  prints.append(fingerprint.fingerprint({"p": {"x": x}}))  # numpy, on the host.
  assert all(p == prints[0] for p in prints), prints
  assert set(prints[0]) == {"p/x"}
  assert prints[0]["p/x"] == _np_checksum(x)
  step = np.int32(1234)
  assert fingerprint.fingerprint({"step": jnp.asarray(step)})["step"] == _np_checksum(step)

  changed = x.copy()
  changed[5, 3] = np.nextafter(changed[5, 3], np.float32(np.inf))  # One ulp.
  swapped = x.copy()
  swapped[[2, 9], [1, 6]] = swapped[[9, 2], [6, 1]]
  sharded = NamedSharding(mesh, P("d"))
  for other in (changed, swapped):
    got = fingerprint.fingerprint({"p": {"x": jax.device_put(other, sharded)}})["p/x"]
    assert got == _np_checksum(other) != prints[0]["p/x"]

  assert fingerprint.nonfinite_paths({"p": {"x": jax.device_put(x, sharded)}}) == []
  bad = x.copy()
  bad[7, 7] = np.nan
  assert fingerprint.nonfinite_paths(
      {"a": jnp.full(3, jnp.inf), "p": {"x": jax.device_put(bad, sharded)},
       "n": jnp.arange(3)}) == ["a", "p/x"]


# ---------------------------------------------------------------------------
# Damaged checkpoints.

@pytest.mark.unit
def test_flipped_bytes_fall_back_to_the_previous_step(mesh, tmp_path, capsys):
  _save(mesh, tmp_path, [1, 2])
  directory = tmp_path / "checkpoints"
  _flip_bytes(_data_files(directory / "2")[0])

  # Why checksums of our own: orbax's OCDBT checksums its b-tree nodes, not
  # the chunks of larger arrays, so plain orbax restores these flipped bytes
  # without a word, as wrong values.
  plain = ocp.CheckpointManager(directory, item_names=("state", "data"))
  garbage = plain.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(mesh))))["state"]
  plain.close()
  wrong = np.asarray(garbage["params"]["w"]) != _values(2)["params"]["w"]
  assert 0 < wrong.sum() < 16, wrong.sum()  # Loaded; a few values garbage.

  capsys.readouterr()
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  state, position, step = checkpoint.restore_with_step(mngr, _abstract(mesh))
  out = capsys.readouterr().err
  assert step == 1 and position == _position(1)
  _assert_state_is(state, 1)
  assert (f"Checkpoint step 2 in {directory} is unusable: 1 of its 4 arrays do "
          "not match the checksums recorded when it was saved (params/w)") in out
  moved = tmp_path / checkpoint.UNUSABLE_DIR / "2"
  assert f"Moved unusable checkpoint step 2 to {moved}" in out
  assert (f"Restored checkpoint step 1 of {directory} instead of the unusable "
          "newer step 2 (checksums verified)") in out
  # Set aside, not deleted; orbax no longer counts it.
  assert not (directory / "2").exists()
  assert "state/manifest.ocdbt" in _all_files(moved)
  assert mngr.all_steps() == [1] and mngr.latest_step() == 1

  # The run goes on: step 2 is saved again, and restores verified.
  assert checkpoint.save(mngr, 2, _state(mesh, 2), _position(2))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2]
  state, position = checkpoint.restore(mngr, _abstract(mesh))
  _assert_state_is(state, 2)
  assert position == _position(2)
  mngr.close()


def _truncate_data_file(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_data(step_dir):
  _truncate_data_file(_data_files(step_dir)[0])


def _delete_data(step_dir):
  os.remove(_data_files(step_dir)[0])


def _delete_manifest(step_dir):
  # (Deleting state/_METADATA instead does no harm: orbax restores from the
  # target tree, the checksums match, and the step is rightly taken.)
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _delete_integrity(step_dir):
  shutil.rmtree(os.path.join(step_dir, checkpoint.INTEGRITY_ITEM))


def _garble_json(item):
  def damage(step_dir):
    with open(os.path.join(step_dir, item, "metadata"), "r+b") as f:
      f.truncate(os.path.getsize(f.name) // 2)
  return damage


def _edit_data_position(step_dir):
  # Valid JSON, wrong value: only the integrity record can tell.
  with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
    json.dump({"examples_per_process": 21}, f)


@pytest.mark.parametrize("damage, reason", [
    (_truncate_data, "orbax could not read it"),
    (_delete_data, "orbax could not read it"),
    (_delete_manifest, "orbax could not read it"),
    (_delete_integrity, "its integrity record (integrity/) is missing"),
    (_garble_json("integrity"), "its integrity record is unreadable"),
    (_garble_json("data"), "orbax could not read it"),
    (_edit_data_position, "its data position does not match its integrity record"),
], ids=["truncated_data", "deleted_data", "deleted_manifest", "deleted_integrity",
        "garbled_integrity_json", "garbled_data_json", "edited_data_json"])
@pytest.mark.unit
def test_damaged_step_is_detected_and_set_aside(mesh, tmp_path, capsys, damage, reason):
  _save(mesh, tmp_path, [1, 2])
  directory = tmp_path / "checkpoints"
  damage(str(directory / "2"))
  damaged_files = _all_files(directory / "2")

  capsys.readouterr()
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  state, position = checkpoint.restore(mngr, _abstract(mesh))
  out = capsys.readouterr().err
  _assert_state_is(state, 1)
  assert position == _position(1)
  assert f"Checkpoint step 2 in {directory} is unusable: {reason}" in out, out
  assert "Restored checkpoint step 1 " in out
  assert _all_files(tmp_path / checkpoint.UNUSABLE_DIR / "2") == damaged_files
  assert mngr.all_steps() == [1]
  mngr.close()


@pytest.mark.unit
def test_save_cut_short_leaves_a_tmp_folder_that_is_ignored(mesh, tmp_path, capsys):
  _save(mesh, tmp_path, [1, 2])
  directory = tmp_path / "checkpoints"
  # What a crash during the save of step 3 leaves: orbax writes a step into
  # "<step>.orbax-checkpoint-tmp" and renames it only once complete. Also an
  # older crash's leftover at a step that is never saved again.
  for step, drop in ((3, "state/_METADATA"), (5, "integrity/metadata")):
    partial = directory / f"{step}.orbax-checkpoint-tmp"
    shutil.copytree(directory / "2", partial)
    os.remove(partial / drop)

  capsys.readouterr()
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  assert mngr.all_steps() == [1, 2]
  state, position, step = checkpoint.restore_with_step(mngr, _abstract(mesh))
  out = capsys.readouterr().err
  assert step == 2 and position == _position(2)
  _assert_state_is(state, 2)
  assert "unusable" not in out
  assert not (tmp_path / checkpoint.UNUSABLE_DIR).exists()

  # Saving step 3 replaces the leftover of the interrupted save.
  assert checkpoint.save(mngr, 3, _state(mesh, 3), _position(3))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2, 3]
  assert not (directory / "3.orbax-checkpoint-tmp").exists()
  state, _, step = checkpoint.restore_with_step(mngr, _abstract(mesh))
  assert step == 3
  _assert_state_is(state, 3)
  mngr.close()


@pytest.mark.unit
def test_every_checkpoint_damaged_is_an_error_that_moves_nothing(mesh, tmp_path):
  _save(mesh, tmp_path, [1, 2])
  directory = tmp_path / "checkpoints"
  for step in (1, 2):
    _flip_bytes(_data_files(directory / str(step))[0])
  before = _all_files(directory)

  mngr = checkpoint.manager(str(tmp_path), keep=3)
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore(mngr, _abstract(mesh))
  message = str(error.value)
  assert f"no usable checkpoint in {directory}:" in message
  assert "step 2: 1 of its 4 arrays do not match the checksums" in message
  assert "step 1: 1 of its 4 arrays do not match the checksums" in message
  assert "Nothing was moved or deleted" in message
  assert f"move {directory} away (or pass a different --workdir)" in message
  # An explicit step does not fall back either.
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 1 .* is unusable"):
    checkpoint.restore(mngr, _abstract(mesh), step=1)
  assert _all_files(directory) == before
  assert not (tmp_path / checkpoint.UNUSABLE_DIR).exists()
  assert mngr.all_steps() == [1, 2]
  mngr.close()


@pytest.mark.unit
def test_read_only_manager_falls_back_without_moving_anything(mesh, tmp_path, capsys):
  _save(mesh, tmp_path, [1, 2])
  directory = tmp_path / "checkpoints"
  _flip_bytes(_data_files(directory / "2")[0])
  before = _all_files(directory)

  capsys.readouterr()
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  state, position, step = checkpoint.restore_with_step(mngr, _abstract(mesh))
  out = capsys.readouterr().err
  assert step == 1 and position == _position(1)
  _assert_state_is(state, 1)
  assert f"Checkpoint step 2 in {directory} is unusable" in out
  assert "read-only: nothing moved" in out
  assert _all_files(directory) == before
  assert not (tmp_path / checkpoint.UNUSABLE_DIR).exists()
  mngr.close()


@pytest.mark.unit
def test_nan_is_never_saved(mesh, tmp_path):
  mngr = checkpoint.manager(str(tmp_path), save_interval_steps=2, keep=3)
  assert checkpoint.save(mngr, 2, _state(mesh, 2), _position(2))
  values = _values(4)
  values["params"]["v"][3, 5] = np.nan
  values["params"]["b"][0] = -np.inf
  # A step the interval skips is not even looked at.
  assert not checkpoint.save(mngr, 3, _state(mesh, 3, values), _position(3))
  with pytest.raises(checkpoint.NonFiniteStateError) as error:
    checkpoint.save(mngr, 4, _state(mesh, 4, values), _position(4))
  assert error.value.step == 4 and error.value.paths == ["params/b", "params/v"]
  assert ("not saving checkpoint step 4" in str(error.value)
          and "NaN or inf in 2 arrays of the state (params/b, params/v)" in str(error.value)
          and "the last checkpoint, step 2, is kept" in str(error.value))
  with pytest.raises(checkpoint.NonFiniteStateError):  # Forcing changes nothing.
    checkpoint.save(mngr, 5, _state(mesh, 5, values), _position(5), force=True)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  mngr.close()


@pytest.mark.unit
def test_checkpoint_without_integrity_record_restores_unverified(mesh, tmp_path, capsys):
  # As this module saved them before integrity records.
  old = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                              item_names=("state", "data"))
  old.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(mesh, 1)),
                                      data=ocp.args.JsonSave(_position(1))))
  old.wait_until_finished()
  old.close()

  capsys.readouterr()
  mngr = checkpoint.manager(str(tmp_path))
  state, position = checkpoint.restore(mngr, _abstract(mesh))
  _assert_state_is(state, 1)
  assert position == _position(1)
  out = capsys.readouterr().err
  assert (f"Warning: restored checkpoint step 1 of {tmp_path / 'checkpoints'} "
          "unverified: it was written before checkpoints carried checksums") in out
  mngr.close()


@pytest.mark.unit
def test_other_state_structure_is_an_error_not_damage(mesh, tmp_path):
  _save(mesh, tmp_path, [1, 2])
  abstract = _abstract(mesh)
  del abstract["params"]["v"]
  mngr = checkpoint.manager(str(tmp_path), keep=3)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 2 .* does not match the state being restored: "
                           r"1 array in it not in the state \(e.g. params/v\)"):
    checkpoint.restore(mngr, abstract)
  assert mngr.all_steps() == [1, 2]
  assert not (tmp_path / checkpoint.UNUSABLE_DIR).exists()
  mngr.close()


# ---------------------------------------------------------------------------
# Two processes.

_WORKER = r'''
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, workdir, tests = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index,
                           initialization_timeout=60, heartbeat_timeout_seconds=30)
import os
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
sys.path.insert(0, tests)
import test_checkpoint_integrity as t
from multimodal.train import checkpoint, fingerprint

mesh = Mesh(np.array(jax.devices()), ("d",))  # 2 processes x 4 devices.
shardings = t._shardings(mesh)

def state(seed):
  return jax.tree.map(
      lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i: v[i]),
      t._values(seed), shardings)

mngr = checkpoint.manager(workdir, keep=3)
for step in (1, 2):
  assert checkpoint.save(mngr, step, state(step), t._position(step))
mngr.wait_until_finished()
multihost_utils.sync_global_devices("saved")
if index == 0:
  # A file only process 1 reads: the shards it wrote, of the rows it holds.
  own = [f for f in t._data_files(os.path.join(workdir, "checkpoints", "2"))
         if "ocdbt.process_1" in f]
  t._truncate_data_file(own[0])
multihost_utils.sync_global_devices("damaged")
state_, position, step = checkpoint.restore_with_step(
    checkpoint.manager(workdir, keep=3), t._abstract(mesh))
w = multihost_utils.process_allgather(state_["params"]["w"], tiled=True)
print("RESULT " + json.dumps({
    "step": step, "position": position,
    "values_ok": bool(np.array_equal(w, t._values(step)["params"]["w"])),
    "fingerprint": fingerprint.fingerprint(state(2))}), flush=True)
'''


@pytest.mark.integration
def test_two_processes_reach_the_same_decision(mesh, tmp_path):
  """Damage only one process can see (its own shards' file): both processes
  still skip the same step, process 0 alone moves it, and the checksums of 2
  processes x 4 devices are those of 1 process x 8 devices."""
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  workdir = tmp_path / "run"
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MM_") and k != "XLA_FLAGS"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4",
             TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([os.path.dirname(tests),
                                         env.get("PYTHONPATH", "")]))
  with killed_on_exit([subprocess.Popen(
      [sys.executable, str(worker), str(port), str(i), str(workdir), tests],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]) as procs:
    outs = [p.communicate(timeout=120) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))
  for result in results:
    assert result["step"] == 1 and result["position"] == _position(1)
    assert result["values_ok"]
  directory = workdir / "checkpoints"
  assert "is unusable: orbax could not read it" in outs[1][1]
  assert (f"Checkpoint step 2 in {directory} is unusable: another process could "
          "not read it") in outs[0][1]
  assert "Moved unusable checkpoint step 2" in outs[0][1]
  assert "Moved" not in outs[1][1]
  assert sorted(os.listdir(directory)) == ["1"]
  assert (workdir / checkpoint.UNUSABLE_DIR / "2" / "state").is_dir()
  single = fingerprint.fingerprint(_state(mesh, 2))
  assert results[0]["fingerprint"] == results[1]["fingerprint"] == single
