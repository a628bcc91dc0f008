"""How every program behind launch.sh reads its command line: `--help`
before anything heavy is imported, `--dashed-names` as aliases of absl's
underscored flags, an unknown flag as one line naming the closest ones, and
relative paths taken from the directory launch.sh was called from.
"""
from __future__ import annotations

import difflib
import os
import sys
import textwrap

from absl import flags

from experiments.common import fail

HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull")
# String flags that name a file or directory: a relative one is the caller's,
# not the repository's (launch.sh runs every program from the repository).
PATH_FLAGS = ("workdir", "hf", "out", "images", "texts", "index", "image", "classnames",
              "data_dir", "cache_dir", "profile", "sweep_dir")
# Our programs' flags live in these modules; absl's own (flagfile, undefok)
# and those of imported libraries are neither listed nor suggested.
_OWN_MODULES = ("experiments.",)


def command() -> str:
  """`./launch.sh CMD`, for messages; set by launch.sh (`python -m` otherwise)."""
  name = os.environ.get("MM_COMMAND")
  return f"./launch.sh {name}" if name else f"python -m {_main_module()}"


def _main_module() -> str:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return spec.name if spec else os.path.basename(sys.argv[0])


def caller_dir() -> str:
  """The directory the user ran launch.sh from (launch.sh itself cds into the repository)."""
  return os.environ.get("MM_CALLER_DIR") or os.getcwd()


def caller_path(path: str | None) -> str | None:
  """`path` as the caller meant it: relative paths join the caller's directory."""
  if not path or os.path.isabs(path) or "://" in path:
    return path
  return os.path.normpath(os.path.join(caller_dir(), os.path.expanduser(path)))


def _own_modules() -> list[str]:
  main = sys.argv[0]
  return [m for m in flags.FLAGS.flags_by_module_dict()
          if m == main or m.startswith(_OWN_MODULES)]


def own_flag_names() -> list[str]:
  names = set()
  for module in _own_modules():
    for flag in flags.FLAGS.flags_by_module_dict()[module]:
      names.add(flag.name)
      if isinstance(flag, flags.BooleanFlag):
        names.add("no" + flag.name)
  return sorted(names)


def flags_help(full: bool = False) -> str:
  """absl's help text of the program's own flags (every flag with `full`)."""
  if full:
    return flags.FLAGS.get_help()
  parts = []
  for module in sorted(_own_modules(), key=lambda m: m != sys.argv[0]):
    text = flags.FLAGS.module_help(module).lstrip("\n")
    parts.append(text.split("\n", 1)[1] if "\n" in text else "")
  return "\n".join(p for p in parts if p.strip())


def print_help(usage: str, extra: str = "", full: bool = False) -> None:
  print(textwrap.dedent(usage).strip())
  print("\nFlags (--name=VALUE or --name VALUE; --name-with-dashes also works):")
  print(flags_help(full))
  if extra:
    print(extra.rstrip())


def wants_help(argv: list[str]) -> str | None:
  """The help flag given before any `--`, if one is."""
  for arg in argv[1:]:
    if arg == "--":
      return None
    if arg in HELP_ARGS:
      return arg
  return None


def undash(argv: list[str], extra_names=()) -> list[str]:
  """`--dry-run[=V]` -> `--dry_run[=V]`, `--no-dry-run` -> `--nodry_run`.

  Only flag names change: values, positional arguments, everything after
  `--` and `--config.KEY` overrides (whose keys are the config's) stay as given.
  """
  known = set(flags.FLAGS) | set(extra_names)
  out, rest = [argv[0]], iter(argv[1:])
  for arg in rest:
    if arg == "--":
      out += [arg, *rest]
      break
    if arg.startswith("--") and not arg.startswith(("--config", "--noconfig")):
      name, sep, value = arg[2:].partition("=")
      if "-" in name:
        name = name.replace("-", "_")
        if name not in known and name.startswith("no_") and name[3:] in known:
          name = "no" + name[3:]
        arg = f"--{name}{sep}{value}"
    out.append(arg)
  return out


def unknown_flag_message(name: str, extra_names=()) -> str:
  candidates = sorted(set(own_flag_names()) | set(extra_names))
  close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
  listed = [c for c in candidates if not (c.startswith("no") and c[2:] in candidates)]
  hint = (f" Did you mean {' or '.join('--' + c for c in close)}?" if close
          else f" Its flags: {', '.join('--' + c for c in listed)}." if listed
          else " It takes no flags.")
  return f"unknown flag --{name}.{hint} ({command()} --help lists them all.)"


def help_if_asked(argv: list[str], usage: str, extra_help: str = "") -> None:
  """Prints the help and exits 0 when argv asks for it."""
  wanted = wants_help(argv)
  if wanted:
    try:
      print_help(usage, extra_help, full=wanted == "--helpfull")
      sys.stdout.flush()
    except BrokenPipeError:
      # `CMD --help | head`: the reader has what it wanted. Python's own
      # flush at exit would fail again on the closed pipe.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def parse(argv: list[str], usage: str, *, extra_help: str = "") -> list[str]:
  """Parses argv into absl's FLAGS (or prints the help and exits 0); every
  mistake is one line and exit status 2. Returns the positional arguments
  (without the program)."""
  help_if_asked(argv, usage, extra_help)
  argv = undash(argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    fail(unknown_flag_message(e.flagname))
  except flags.Error as e:
    fail(f"{str(e).splitlines()[0]} ({command()} --help explains every flag.)")
  resolve_path_flags()
  return rest[1:]


def resolve_path_flags() -> None:
  """Relative paths given on the command line are the caller's."""
  for name in PATH_FLAGS:
    if name in flags.FLAGS and flags.FLAGS[name].present:
      value = flags.FLAGS[name].value
      if isinstance(value, str):
        flags.FLAGS[name].value = caller_path(value)
