"""Hyperparameter sweeps (`./launch.sh sweep`): expanding and checking a
config's get_sweep(), overrides that the real flag parser reads back exactly,
collection into csv/markdown/PNG, the SLURM array script, device sets, and a
2-point learning-rate sweep of configs/clip_shapes.py end to end, rerun."""
import ast
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from conftest import ROOT, TINY_WORLD
from multimodal.sweep import devices as sweep_devices, points as sweep, report as sweep_report


def _run(args, **kwargs):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=kwargs.pop("timeout", 300), **kwargs)


def _clip_config():
  from configs import clip_shapes
  config = clip_shapes.get_config()
  config.lock()
  return config


# -- Definition ----------------------------------------------------------------


@pytest.mark.unit
def test_expand_list_form_keeps_points_and_product_form_multiplies():
  assert sweep.expand([{"lr": 1e-3}, {"lr": 3e-3, "wd": 0.0}]) == [
      {"lr": 1e-3}, {"lr": 3e-3, "wd": 0.0}]
  points = sweep.expand({"lr": [1e-3, 1e-2], "input.batch_size": [32, 64, 128]})
  assert len(points) == 6
  assert points[0] == {"lr": 1e-3, "input.batch_size": 32}
  assert points[-1] == {"lr": 1e-2, "input.batch_size": 128}
  # Lists inside values become tuples (tuple fields); "config." is optional.
  assert sweep.expand([{"config.shape": [1, 2]}]) == [{"shape": (1, 2)}]


@pytest.mark.unit
def test_clip_shapes_defines_a_learning_rate_sweep():
  from configs import clip_shapes
  assert sweep.expand(clip_shapes.get_sweep()) == [
      {"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}]
  assert clip_shapes.get_sweep("lrs=1e-3/1e-2") == {"lr": [1e-3, 1e-2]}
  assert clip_shapes.get_sweep("lrs=3e-4") == {"lr": [3e-4]}
  from multimodal.config import config_lib
  with pytest.raises(config_lib.ConfigError, match="lrs='1e-3/fast'"):
    clip_shapes.get_sweep("lrs=1e-3/fast")
  sweep.check_keys(sweep.expand(clip_shapes.get_sweep()), _clip_config())


@pytest.mark.parametrize("bad, message", [
    ({"lr": 1e-3}, "non-empty list of values"),
    ({"lr": []}, "non-empty list of values"),
    ([{"lr": 1e-3}, "lr=1e-2"], "sweep point 1"),
    ("lr=1e-3", "returned a str"),
    ([], "no points"),
    ([{"lr": 1e-3}, {"lr": 1e-3}], "points 0 and 1 are the same"),
    ([{"lr": None}], "sweep key 'lr': None cannot be passed"),
    ([{"lr": object()}], "sweep key 'lr': value <object.*not a plain literal"),
    ([{"schedule": {"warmup_steps": 5}}], "sweep key 'schedule'.*not a plain literal"),
    ([{"lr": lambda: 1}], "sweep key 'lr'.*function.*not a plain literal"),
])
@pytest.mark.unit
def test_malformed_sweeps_say_what_is_wrong(bad, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.expand(bad)


@pytest.mark.unit
def test_unknown_key_is_named_with_the_closest_valid_keys():
  config = _clip_config()
  with pytest.raises(sweep.SweepError, match=r"unknown config key 'lrr'.*Did you mean 'lr'"):
    sweep.check_keys([{"lr": 1e-3}, {"lrr": 1e-3}], config)
  with pytest.raises(sweep.SweepError,
                     match=r"unknown config key 'input.batch'.*'input.batch_size'"):
    sweep.check_keys([{"input.batch": 64}], config)
  with pytest.raises(sweep.SweepError, match="'schedule' is a whole sub-config"):
    sweep.check_keys([{"schedule": 1}], config)
  with pytest.raises(sweep.SweepError, match="also given as --config.lr"):
    sweep.check_keys([{"lr": 1e-3}], config, ["--config.lr=1e-2"])


@pytest.mark.unit
def test_values_that_do_not_fit_their_field_are_named():
  spec = "configs/clip_shapes.py"
  sweep.check_points(spec, [{"lr": 1e-3, "input.batch_size": 32}])
  with pytest.raises(sweep.SweepError, match="sweep point 1.*batch_size"):
    sweep.check_points(spec, [{"input.batch_size": 32}, {"input.batch_size": "big"}])
  with pytest.raises(sweep.SweepError, match="sweep point 0.*--config.seed=True"):
    sweep.check_points(spec, [{"seed": True}])
  with pytest.raises(sweep.SweepError, match="sweep key 'evals.retrieval.single_object"
                     "_only': 1 .int. does not fit.*True .bool."):
    sweep.check_points(spec, [{"evals.retrieval.single_object_only": 1}])
  with pytest.raises(sweep.SweepError, match="sweep key 'compute_dtype': 32 .int."):
    sweep.check_points(spec, [{"compute_dtype": 32}])
  # The built config is validated as `run` would: a bad preprocessing op.
  with pytest.raises(sweep.SweepError, match="sweep point 0.*input.pp"):
    sweep.check_points(spec, [{"input.pp": "decode|no_such_op"}])


@pytest.mark.unit
def test_point_names_are_readable_stable_and_unique(tmp_path):
  points = sweep.expand({"lr": [1e-3, 1e-2], "input.batch_size": [64]})
  assert sweep.point_names(points) == ["lr=0.001,batch_size=64", "lr=0.01,batch_size=64"]
  # Suffixes grow until they tell keys apart; odd characters become "_".
  names = sweep.point_names([{"model.image.variant": "S/8", "model.text.variant": "mu"}])
  assert names == ["image.variant=S_8,text.variant=mu"]
  # Names that sanitise alike get a digest to stay distinct.
  a, b = sweep.point_names([{"name": "a/b"}, {"name": "a:b"}])
  assert a != b and a.startswith("name=a_b-") and b.startswith("name=a_b-")
  made = sweep.make_points(points, str(tmp_path))
  assert made[1].workdir == str(tmp_path / "lr=0.01,batch_size=64")
  assert made[1].args() == ["--config.lr=0.01", "--config.input.batch_size=64"]


ROUND_TRIP_CONFIG = """
from ml_collections import config_dict

def get_config(arg=None):
  c = config_dict.ConfigDict()
  c.task = "classify"
  c.total_steps = 1
  for i in range(7):
    c[f"f{i}"] = 1.5
  c.i0, c.i1, c.i2 = 1, 1, 1
  c.b0, c.b1 = False, True
  c.sub = dict(s0="x", s1="x", s2="x", s3="x", s4="x")
  c.t0, c.t1 = (0,), ("a",)
  return c
"""

ROUND_TRIP_VALUES = {
    "f0": 1e-3, "f1": 3e-4, "f2": 0.1 + 0.2, "f3": 1e-10, "f4": 2.5e8, "f5": -0.5,
    "f6": 7.0, "i0": 0, "i1": -3, "i2": 10 ** 12, "b0": True, "b1": False,
    "sub.s0": "S/8", "sub.s1": "a,b=c", "sub.s2": "1e-3", "sub.s3": "two words",
    "sub.s4": "decode|resize(64)", "t0": (1, 2), "t1": ("a", 0.5, (3,)),
}


@pytest.mark.integration
def test_overrides_round_trip_through_the_real_cli_parser(tmp_path):
  """The exact flags a point's training gets, read by experiments/cli.py in a
  fresh process, give back every value with its type."""
  config_path = tmp_path / "round_trip.py"
  config_path.write_text(ROUND_TRIP_CONFIG)
  args = sweep.override_args(sweep.expand([ROUND_TRIP_VALUES])[0])
  script = textwrap.dedent("""
      import sys
      from experiments import cli
      cli.parse_flags(sys.argv)
      print(repr(cli.CONFIG.value.to_dict()))
  """)
  run = _run(["-c", script, str(config_path), *args])
  assert run.returncode == 0, run.stderr[-3000:]
  parsed = ast.literal_eval(run.stdout.strip().splitlines()[-1])
  for key, want in ROUND_TRIP_VALUES.items():
    got = parsed
    for part in key.split("."):
      got = got[part]
    assert got == want and type(got) is type(want), (key, want, got)
  # The in-process check uses the same parser and agrees.
  sweep.check_points(str(config_path), [ROUND_TRIP_VALUES])


# -- Devices and SLURM -----------------------------------------------------------


@pytest.mark.unit
def test_parallel_points_get_disjoint_devices():
  assert sweep_devices.device_envs("cpu", [], 3) == [{}, {}, {}]
  assert sweep_devices.device_envs("gpu", ["0", "1", "2", "3"], 1) == [{}]
  assert sweep_devices.device_envs("gpu", ["0", "1", "2", "3"], 2) == [
      {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
  assert sweep_devices.device_envs("gpu", ["4", "6", "7"], 3) == [
      {"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "6"},
      {"CUDA_VISIBLE_DEVICES": "7"}]
  tpu = sweep_devices.device_envs("tpu", ["0", "1", "2", "3"], 4)
  assert [e["TPU_VISIBLE_CHIPS"] for e in tpu] == ["0", "1", "2", "3"]
  assert {e["TPU_CHIPS_PER_PROCESS_BOUNDS"] for e in tpu} == {"1,1,1"}
  assert len({e["TPU_PROCESS_PORT"] for e in tpu}) == 4
  assert sweep_devices.device_envs("tpu", ["0", "1", "2", "3"], 2)[1]["TPU_VISIBLE_CHIPS"] == "2,3"
  with pytest.raises(sweep.SweepError, match="needs at least 4 GPUs; this host has 2"):
    sweep_devices.device_envs("gpu", ["0", "1"], 4)


@pytest.mark.unit
def test_array_spec_compresses_indices():
  assert sweep_devices.array_spec([0, 1, 2]) == "0-2"
  assert sweep_devices.array_spec([5, 0, 2, 3]) == "0,2-3,5"
  assert sweep_devices.array_spec([4]) == "4"


@pytest.mark.integration
def test_slurm_dry_run_prints_the_array_script_of_the_unfinished_points(tmp_path):
  sweep_dir = tmp_path / "sw"
  finished = sweep_dir / "lr=0.003"  # The middle point of the default 3.
  finished.mkdir(parents=True)
  (finished / "results.json").write_text(json.dumps({"metrics": {}}))
  run = _run(["-m", "experiments.sweep", "configs/clip_shapes.py:steps=100",
              "--slurm", "--dry-run", f"--sweep-dir={sweep_dir}", "--parallel=2",
              "--sbatch", "partition=gpu", "--sbatch=--time=2:00:00",
              "--config.input.batch_size=32"])
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout == textwrap.dedent(f"""\
      #!/bin/bash
      #SBATCH --job-name=sw
      #SBATCH --array=0,2%2
      #SBATCH --output={sweep_dir}/slurm-%A_%a.log
      #SBATCH --partition=gpu
      #SBATCH --time=2:00:00
      # One array task per sweep point (written by ./launch.sh sweep --slurm).
      set -euo pipefail
      cd {ROOT}
      {sys.executable} -m experiments.sweep configs/clip_shapes.py:steps=100 \
--sweep_dir={sweep_dir} --config.input.batch_size=32 --point="$SLURM_ARRAY_TASK_ID"
      """)
  assert not (sweep_dir / "sweep.sbatch").exists()  # A dry run writes nothing.


# -- Collection ------------------------------------------------------------------


def _fake_sweep(tmp_path):
  """lr x batch_size, 4 points: 3 finished with fake results, 1 failed."""
  points = sweep.make_points(
      sweep.expand({"lr": [1e-3, 1e-1], "input.batch_size": [32, 64]}), str(tmp_path))
  accuracy = {0: 0.5, 1: 0.7, 2: 0.9}
  for point in points:
    os.makedirs(point.workdir)
    if point.index in accuracy:
      metrics = {"eval/acc1": accuracy[point.index],
                 "eval/loss": 1 - accuracy[point.index]}
      with open(os.path.join(point.workdir, "results.json"), "w") as f:
        json.dump({"step": 10, "total_steps": 10, "wall_time_seconds": 3.5,
                   "metrics": metrics}, f)
    else:
      open(os.path.join(point.workdir, sweep.FAILED_MARKER), "w").close()
  return points


@pytest.mark.unit
def test_collect_writes_csv_markdown_and_plots(tmp_path):
  points = _fake_sweep(tmp_path)
  result = sweep_report.collect(points, str(tmp_path))
  assert result["metric"] == "eval/acc1" and result["mode"] == "max"
  assert result["winner"] == "lr=0.1,batch_size=32"

  with open(tmp_path / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == [p.name for p in points]
  assert list(rows[0]) == ["point", "lr", "input.batch_size", "status", "step",
                           "wall_time_seconds", "eval/acc1", "eval/loss"]
  assert rows[2] == {"point": "lr=0.1,batch_size=32", "lr": "0.1",
                     "input.batch_size": "32", "status": "done", "step": "10",
                     "wall_time_seconds": "3.5", "eval/acc1": "0.9",
                     "eval/loss": repr(1 - 0.9)}
  assert rows[3]["status"] == "failed" and rows[3]["eval/acc1"] == ""

  md = (tmp_path / "sweep.md").read_text()
  assert md == result["markdown"]
  table = [line for line in md.splitlines() if line.startswith("| ")][1:]
  assert [line.split(" | ")[0] for line in table] == [
      "| **lr=0.1,batch_size=32**", "| lr=0.001,batch_size=64",
      "| lr=0.001,batch_size=32", "| lr=0.1,batch_size=64"]
  assert "Sorted by `eval/acc1` (higher is better)" in md

  # One plot per (metric, swept hyperparameter), each a real PNG.
  assert len(result["plots"]) == 4
  for path in result["plots"]:
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size[0] > 100
      image.verify()
  assert os.path.basename(result["plots"][0]) == "eval.acc1--lr.png"
  assert sweep_report.use_log_x([1e-3, 1e-1]) and sweep_report.use_log_x([1e-3, 1e-2])
  assert not sweep_report.use_log_x([32, 64]) and not sweep_report.use_log_x(["a", "b"])

  # A loss ranks lowest first; an unknown metric is refused by name.
  by_loss = sweep_report.collect(points, str(tmp_path), metric="eval/loss")
  assert by_loss["mode"] == "min" and by_loss["winner"] == "lr=0.1,batch_size=32"
  worst = sweep_report.collect(points, str(tmp_path), metric="eval/acc1", mode="min")
  assert worst["winner"] == "lr=0.001,batch_size=32"
  with pytest.raises(sweep.SweepError, match="'eval/acc' is not among.*eval/acc1"):
    sweep_report.collect(points, str(tmp_path), metric="eval/acc")


@pytest.mark.unit
def test_collect_before_any_point_finished(tmp_path):
  points = sweep.make_points(sweep.expand({"lr": [1e-3, 1e-2]}), str(tmp_path))
  result = sweep_report.collect(points, str(tmp_path))
  assert result["winner"] is None and result["plots"] == []
  assert "No point has finished yet" in result["markdown"]
  with open(tmp_path / "sweep.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["pending", "pending"]


# -- The command line ------------------------------------------------------------

FAILING_SWEEP_CONFIG = """
from configs.clip_shapes import get_config

def get_sweep(arg=None):
  # Each passes the config checks and fails when its run reads its data.
  return [{"input.data": "captions:/no/such.tsv"}, {"input.data": "captions:/nor/this.tsv"}]
"""


@pytest.mark.integration
def test_a_failing_point_is_reported_and_the_sweep_goes_on(tmp_path):
  config_path = tmp_path / "failing.py"
  config_path.write_text(FAILING_SWEEP_CONFIG)
  sweep_dir = tmp_path / "sw"
  run = _run(["-m", "experiments.sweep", str(config_path), f"--sweep_dir={sweep_dir}"])
  assert run.returncode == 1, run.stderr[-3000:]
  assert "such.tsv: FAILED (exit status" in run.stdout
  assert "this.tsv: FAILED" in run.stdout  # The sweep went on.
  assert "captions:/no/such.tsv does not exist" in run.stdout  # The log's end.
  assert "2 of 2 points failed" in run.stderr
  (first,) = [p for p in sweep_dir.iterdir() if p.is_dir() and "such" in p.name]
  assert "captions:/no/such.tsv does not exist" in (first / "train.log").read_text()
  with open(sweep_dir / "sweep.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["failed", "failed"]
  assert json.loads((sweep_dir / "sweep.json").read_text())["points"][1]["args"] == [
      "--config.input.data=captions:/nor/this.tsv"]


@pytest.mark.integration
def test_a_bad_sweep_is_one_error_line(tmp_path):
  config_path = tmp_path / "typo.py"
  config_path.write_text(
      'from configs.clip_shapes import get_config\n\n'
      'def get_sweep(arg=None):\n  return [{"taks": "clip"}]\n')
  run = _run(["-m", "experiments.sweep", str(config_path),
              f"--sweep_dir={tmp_path / 'sw'}"])
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith(
      "error: sweep: unknown config key 'taks'. Did you mean 'task'? Keys at that "
      "level: ckpt_steps, compute_dtype,")
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "sw").exists()


@pytest.mark.integration
def test_lr_sweep_of_clip_shapes_end_to_end_then_rerun_skips(data_dir, tmp_path):
  """Two tiny CLIP runs (4 steps) at once, as `./launch.sh sweep` runs them;
  the rerun retrains nothing and rewrites the same table."""
  sweep_dir = tmp_path / "sw"
  world = [f"--config.input.shapes_world.{k}={v}" for k, v in TINY_WORLD.items()]
  args = ["-m", "experiments.sweep",
          "configs/clip_shapes.py:variant=mu/8,text_variant=mu,steps=4,res=32,batch=32",
          "--sweep_args=lrs=1e-3/1e-2", f"--sweep_dir={sweep_dir}", "--parallel=2",
          "--metric=zero_shot_shape/acc1", f"--config.input.data_dir={data_dir}",
          "--config.input.tokenizer.vocab_size=128", "--config.input.shuffle_buffer=500",
          *world]
  run = _run(args, timeout=1200)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  names = ["lr=0.001", "lr=0.01"]
  for name in names:
    assert f"{name}: done in" in run.stdout
    config = json.loads((sweep_dir / name / "config.json").read_text())
    assert config["lr"] == float(name.split("=")[1])
    assert config["input"]["batch_size"] == 32 and config["total_steps"] == 4
  stamps = {n: os.stat(sweep_dir / n / "results.json").st_mtime_ns for n in names}

  again = _run(args, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  for name in names:
    assert f"{name}: finished already, skipped." in again.stdout
    assert os.stat(sweep_dir / name / "results.json").st_mtime_ns == stamps[name]
  assert ": training" not in again.stdout
  assert "Sorted by `zero_shot_shape/acc1` (higher is better)" in again.stdout

  with open(sweep_dir / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["point"], r["lr"], r["status"], r["step"]) for r in rows] == [
      ("lr=0.001", "0.001", "done", "4"), ("lr=0.01", "0.01", "done", "4")]
  for row in rows:
    assert 0 <= float(row["zero_shot_shape/acc1"]) <= 1
    assert 0 <= float(row["retrieval/text_to_image_recall@10"]) <= 1
  assert (sweep_dir / "plots" / "zero_shot_shape.acc1--lr.png").exists()
