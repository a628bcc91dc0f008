"""The command line of every `./launch.sh` command: `--help` names every flag
and exits 0, a misspelt flag is one line naming the closest and exit status 2,
dashed flag names are aliases of absl's underscored ones, `help` needs no
.venv, `configs` lists configs/, `--print_config` shows the resolved config,
config paths resolve from the caller's directory, and a config mistake fails
before TensorFlow or JAX is imported. Every process here exits before
anything heavy loads."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

LAUNCH = os.path.join(ROOT, "launch.sh")
# Command -> its program in experiments/.
PROGRAMS = {"run": "train", "sweep": "sweep", "eval": "evaluate", "sample": "sample",
            "embed": "embed", "search": "search", "ask": "ask", "caption": "ask",
            "bench": "bench", "bench-flags": "bench_flags", "configs": "configs_list"}
# Command -> a flag of its own, misspelt, and the flag it should suggest.
MISSPELT = {"run": ("--workdri", "--workdir"), "sweep": ("--paralel", "--parallel"),
            "eval": ("--batchsize", "--batch_size"), "sample": ("--promt", "--prompt"),
            "embed": ("--imges", "--images"), "search": ("--indx", "--index"),
            "ask": ("--temprature", "--temperature"), "caption": ("--imgae", "--image"),
            "bench": ("--familes", "--families"), "bench-flags": ("--xla_flag", "--xla_flags")}
# `python -c` run before the program: fails loudly if TensorFlow or JAX loads.
_NO_HEAVY_IMPORTS = (
    "import atexit, os, runpy, sys\n"
    "def check():\n"
    "  heavy = [m for m in ('tensorflow', 'jax') if m in sys.modules]\n"
    "  if heavy:\n"
    "    sys.stderr.write(f'HEAVY IMPORTS: {heavy}\\n')\n"
    "    os._exit(99)\n"
    "atexit.register(check)\n"
    "sys.argv = [sys.argv[1] + '.py', *sys.argv[2:]]\n"
    "runpy.run_module(sys.argv[0][:-3], run_name='__main__', alter_sys=True)\n")


def _launch(*args, cwd=ROOT, env=None, timeout=60):
  return subprocess.run([LAUNCH, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


def _light(command, *args, cwd=ROOT):
  """`./launch.sh COMMAND ARGS` as its Python program, failing (exit status
  99) if TensorFlow or JAX was imported by the time it exits."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("MM_")}
  env.update(MM_CALLER_DIR=str(cwd), MM_COMMAND=command)
  return subprocess.run(
      [sys.executable, "-c", _NO_HEAVY_IMPORTS, f"experiments.{PROGRAMS[command]}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def _flag_names(program: str) -> list[str]:
  """The flags a program defines (absl DEFINE_* calls and the shared ones)."""
  names = []
  sources = [f"experiments/{program}.py"]
  source = open(os.path.join(ROOT, sources[0])).read()
  if "define_model_flags" in source:
    names += ["workdir", "hf"]
  if "cli.parse_flags" in source:
    sources.append("experiments/cli.py")
  for path in sources:
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE_") and node.args
          and isinstance(node.args[0], ast.Constant)):
        names.append(node.args[0].value)
  return names


def _one_error_line(run) -> str:
  assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
  assert "Traceback" not in run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr
  return lines[0]


@pytest.mark.parametrize("command", sorted(PROGRAMS))
def test_help_names_every_flag_and_exits_0(command):
  for help_arg in ("--help", "-h"):
    run = _light(command, help_arg)
    assert run.returncode == 0, run.stderr[-2000:]
    names = _flag_names(PROGRAMS[command] if command != "caption" else "ask")
    missing = [n for n in names if f"--{n}" not in run.stdout and f"--[no]{n}" not in run.stdout]
    assert not missing, run.stdout
    assert "Unknown command line flag" not in run.stdout + run.stderr


def test_run_help_names_the_launcher_flags():
  from experiments import launcher
  run = _light("run", "--help")
  assert all(f"--{name}" in run.stdout for name in launcher.FLAGS), run.stdout


@pytest.mark.parametrize("command", sorted(MISSPELT))
def test_a_misspelt_flag_is_one_line_naming_the_closest(command):
  wrong, right = MISSPELT[command]
  line = _one_error_line(_light(command, wrong, "1"))
  assert line.startswith(f"error: unknown flag {wrong}.") and right in line, line


def test_dashed_flag_names_are_aliases():
  # Accepted: the error is the program's own, about what is missing, not the flag.
  line = _one_error_line(_light("eval", "--batch-size", "3"))
  assert "unknown flag" not in line and "--benchmarks" in line
  line = _one_error_line(_light("search", "--index=x.npz", "--text", "a", "--image", "b"))
  assert "exactly one query" in line


def test_run_takes_the_launcher_flags_with_dashes_or_underscores(tmp_path):
  for spelling in (["--devices-per-proc", "2", "--dry-run"],
                   ["--devices_per_proc=2", "--dry_run"]):
    run = _light("run", "configs/clip_shapes.py", "--procs", "2", *spelling,
                 f"--workdir={tmp_path}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and all("xla_force_host_platform_device_count=2" in l
                                   for l in lines)


def test_launch_sh_help_needs_no_venv(tmp_path):
  # A copy of launch.sh beside a pyproject.toml but no .venv, with no python3
  # on PATH: any attempt to install fails loudly.
  shutil.copy(LAUNCH, tmp_path / "launch.sh")
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
  env = {"PATH": "/usr/bin:/bin"}
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("sed", "bash", "cat", "dirname", "sha256sum", "cut"):
    path = shutil.which(tool, path="/usr/bin:/bin")
    if path:
      os.symlink(path, bin_dir / tool)
  env["PATH"] = str(bin_dir)
  for args in (["help"], ["--help"], ["-h"], ["install", "--help"]):
    run = subprocess.run([str(tmp_path / "launch.sh"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode == 0, (args, run.stderr)
    assert "installing" not in run.stderr and not (tmp_path / ".venv").exists()
    if args == ["help"]:
      for command in (*PROGRAMS, "test", "install", "help"):
        assert f"./launch.sh {command}" in run.stdout, command


def test_launch_sh_command_help_and_unknown_command():
  run = _launch("eval", "--help")
  assert run.returncode == 0 and "--benchmarks" in run.stdout
  run = _launch("help", "embed")
  assert run.returncode == 0 and "--images" in run.stdout
  line = _one_error_line(_launch("evaluate"))
  assert "unknown command 'evaluate'" in line and "eval" in line


def test_configs_lists_every_config_with_its_args():
  run = _light("configs")
  assert run.returncode == 0, run.stderr
  files = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and f != "__init__.py")
  for name in files:
    assert f"configs/{name}: " in run.stdout, name
  assert "variant=mu/8" in run.stdout and "steps=3600" in run.stdout  # siglip's own.


def test_print_config_prints_the_resolved_override():
  run = _light("run", "configs/clip_shapes.py:steps=77", "--config.lr=0.25",
               "--print-config")
  assert run.returncode == 0, run.stderr[-2000:]
  config = json.loads(run.stdout)
  assert config["lr"] == 0.25 and config["total_steps"] == 77


@pytest.mark.parametrize("args, expected", [
    (["--config.lrr=1"], "unknown config key 'lrr'. Did you mean 'lr'?"),
    (["--config.lr=abc"], "config.lr takes a float"),
    (["clip_shapes.py:stepz=3"], "unknown config argument 'stepz'"),
    (["clip_shape.py"], "Did you mean clip_shapes.py?"),
])
def test_config_mistakes_fail_before_tensorflow_or_jax_load(args, expected):
  # _light exits 99 instead if either was imported.
  assert expected in _one_error_line(_light("run", *args))


def test_config_paths_resolve_from_the_callers_directory(tmp_path):
  (tmp_path / "my_config.py").write_text(
      "from configs import clip_shapes\n"
      "def get_config(arg=None):\n"
      "  config = clip_shapes.get_config(arg)\n"
      "  config.lr = 0.125\n"
      "  return config\n")
  run = _launch("run", "my_config.py", "--print_config", cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(run.stdout)["lr"] == 0.125
  # A repository config by its bare name, from anywhere.
  run = _launch("run", "dit_shapes.py", "--print_config", cwd=tmp_path)
  assert run.returncode == 0 and json.loads(run.stdout)["task"] == "dit"


def test_relative_workdir_is_the_callers(tmp_path):
  run = _light("run", "--procs=1", "--dry_run", "--workdir=here", cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"--workdir={tmp_path / 'here'}" in run.stdout


def test_help_into_a_closed_pipe_is_no_traceback():
  """`./launch.sh run --help | head -1`: the reader may close the pipe before
  the help is written. Here it is closed from the start, so every write fails."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("MM_")}
  read_end, write_end = os.pipe()
  os.close(read_end)
  try:
    run = subprocess.run([sys.executable, "-m", "experiments.train", "--help"], cwd=ROOT,
                         stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                         env=env)
  finally:
    os.close(write_end)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
