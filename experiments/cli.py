"""Command-line plumbing shared by the programs behind launch.sh: config
files with big_vision-style args, locked configs whose unknown keys are named
with their closest valid keys, and default workdirs.
"""
from __future__ import annotations

import datetime
import difflib
import glob
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import flags_cli
from experiments.common import fail
from multimodal.config import config_lib
from multimodal.tasks import config_checks

DEFAULT_CONFIG = "configs/clip_shapes.py"
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/clip_shapes.py:variant=S/8 "
    "(or CONFIG[:ARGS] as the first argument); then --config.KEY=VALUE overrides any "
    "key. A relative path is looked up in your directory, then in the repository "
    "and its configs/ (./launch.sh configs lists them).",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything "
                              "(default: runs/CONFIG-DATE-TIME in the repository).")
PRINT_CONFIG = flags.DEFINE_boolean(
    "print_config", False, "Print the resolved, validated config as JSON and exit.")


def normalise_argv(argv: list[str]) -> list[str]:
  """Lets `run CONFIG[:ARGS] ...` stand for `run --config=CONFIG[:ARGS] ...`
  (and `--config CONFIG` for `--config=CONFIG`)."""
  rest = argv[1:]
  if rest and not rest[0].startswith("-"):
    rest = [f"--config={rest[0]}"] + rest[1:]
  if "--config" in rest:
    i = rest.index("--config")
    if i + 1 < len(rest):
      rest = rest[:i] + [f"--config={rest[i + 1]}"] + rest[i + 2:]
  if not any(a.startswith("--config=") for a in rest):
    rest = [f"--config={DEFAULT_CONFIG}"] + rest
  return argv[:1] + rest


def _with_resolved_config(argv: list[str]) -> list[str]:
  """argv with its --config file found (flags_cli's caller directory first,
  then the repository and its configs/), or one line listing the configs."""
  i, spec = next((i, a.split("=", 1)[1]) for i, a in enumerate(argv)
                 if a.startswith("--config="))
  path, sep, arg = spec.partition(":")
  resolved = config_lib.resolve_config_path(path)
  if not os.path.isfile(resolved):
    known = sorted(os.path.basename(k) for k in glob.glob(
        os.path.join(config_lib.REPO_ROOT, "configs", "*.py"))
        if not k.endswith("__init__.py"))
    close = difflib.get_close_matches(os.path.basename(path), known, n=1)
    fail(f"config file '{path}' does not exist (looked in {flags_cli.caller_dir()} and "
         f"{os.path.join(config_lib.REPO_ROOT, 'configs')})."
         + (f" Did you mean {close[0]}?" if close else "")
         + f" Configs: {', '.join(known)} (./launch.sh configs describes them).")
  return argv[:i] + [f"--config={resolved}{sep}{arg}"] + argv[i + 1:]


def parse_flags(argv: list[str], usage: str | None = None, *, extra_help: str = "",
                extra_names=()) -> list[str]:
  """Parses flags, turning config mistakes into one clear line on stderr;
  prints the help (`--help`) or the resolved config (`--print_config`) and
  exits 0. Returns argv as parsed: the config flag first, its path resolved."""
  flags_cli.help_if_asked(argv, usage or __doc__, extra_help)
  argv = _with_resolved_config(normalise_argv(flags_cli.undash(argv, extra_names)))
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  try:
    config_lib.load_config_file(spec)
  except config_lib.ConfigError as e:
    fail(str(e))
  except Exception as e:  # noqa: BLE001 -- any failure of the config file.
    fail(f"could not build the config {spec}: {type(e).__name__}: {e}")
  try:
    flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    if not e.flagname.startswith(("config.", "noconfig.")):
      fail(flags_cli.unknown_flag_message(e.flagname, extra_names))
    fail(_explain_flag_error(e, argv))
  except Exception as e:  # noqa: BLE001 -- config_flags raises many types.
    fail(_explain_flag_error(e, argv))
  flags_cli.resolve_path_flags()
  try:
    config = CONFIG.value
  except Exception as e:  # A config file that fails to import or build.
    fail(f"could not build the config: {type(e).__name__}: {e}")
  try:
    check_override_values(config, argv)
    config_checks.check(config)
  except config_lib.ConfigError as e:
    fail(str(e))
  if PRINT_CONFIG.value:
    print(config_lib.to_json(config))
    sys.exit(0)
  return argv


def check_override_values(config, argv: list[str]) -> None:
  """No --config.KEY=VALUE override that became a string holds Python code.

  config_flags never evaluates a value (a str field takes the raw text;
  int, float and bool fields convert it; tuples go through
  ast.literal_eval), but code in a config is refused all the same, by name.
  """
  for key in _override_keys(argv):
    if config_lib.has_dotted(config, key):
      config_lib.check_override_value(key, config_lib.get_dotted(config, key))


def _override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv[1:]:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split("=", 1)[0])
  return keys


def _explain_flag_error(error: Exception, argv: list[str]) -> str:
  """Names the first override whose key the config does not have, or whose
  value does not fit its field (with the type it takes)."""
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  try:
    config = config_lib.load_config_file(spec)
  except Exception as e:  # noqa: BLE001 -- any failure of the config file.
    return f"could not build the config {spec}: {type(e).__name__}: {e}"
  return config_lib.explain_override_error(error, config, argv[1:])


def config_name() -> str:
  path = flags.FLAGS["config"].config_filename
  return os.path.splitext(os.path.basename(path))[0]


def default_workdir() -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config_name()}-{stamp}")
