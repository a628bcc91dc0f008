"""`./launch.sh configs`: every config in configs/ with its one-line
description and the args of `CONFIG:ARG=VALUE,...` (get_config's
config_lib.parse_arg defaults), read from the source with `ast`: listing
the configs imports neither them nor TensorFlow or JAX.

  ./launch.sh configs              every config
  ./launch.sh configs NAME ...     only these (e.g. dit_shapes or configs/dit_shapes.py)
"""
from __future__ import annotations

import ast
import glob
import os
import re
import sys

from experiments import flags_cli
from experiments.common import fail
from multimodal.config import config_lib

CONFIGS_DIR = os.path.join(config_lib.REPO_ROOT, "configs")
# "k=v,k=v": the defaults a config passes to another's get_config.
_ARG_STRING = re.compile(r"^\w+=[^,=]+(,\w+=[^,=]+)*$")


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
  return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name),
              None)


def _constants(tree: ast.Module) -> dict[str, ast.expr]:
  """The module's `NAME = literal` assignments, for defaults given by name."""
  return {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
          for t in n.targets if isinstance(t, ast.Name)}


def _as_typed(node: ast.expr, constants: dict) -> str:
  """A default as one types it after `CONFIG:` (strings bare: variant=mu/8)."""
  if isinstance(node, ast.Name) and node.id in constants:
    node = constants[node.id]
  try:
    value = ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError):
    return ast.unparse(node)
  return value if isinstance(value, str) else repr(value)


def config_args(path: str, seen=()) -> dict[str, str]:
  """{arg: default as typed} of `path`'s get_config: its parse_arg call's
  keywords, or those of the config it builds on (`clip_shapes.get_config(...)`)
  with the defaults that config's arg string sets."""
  tree = ast.parse(open(path).read(), path)
  func = _function(tree, "get_config")
  if func is None:
    return {}
  for node in ast.walk(func):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "parse_arg"):
      constants = _constants(tree)
      return {kw.arg: _as_typed(kw.value, constants) for kw in node.keywords if kw.arg}
  for node in ast.walk(func):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get_config" and isinstance(node.func.value, ast.Name)):
      base = os.path.join(os.path.dirname(path), f"{node.func.value.id}.py")
      if os.path.isfile(base) and base not in seen:
        args = config_args(base, (*seen, path))
        for const in ast.walk(func):
          if (isinstance(const, ast.Constant) and isinstance(const.value, str)
              and _ARG_STRING.match(const.value)):
            for item in const.value.split(","):
              key, _, value = item.partition("=")
              if key in args:
                args[key] = value
        return args
  return {}


def describe(path: str) -> dict:
  tree = ast.parse(open(path).read(), path)
  doc = (ast.get_docstring(tree) or "").strip()
  return {"name": os.path.basename(path), "description": doc.splitlines()[0] if doc else "",
          "args": config_args(path), "sweep": _function(tree, "get_sweep") is not None}


def config_files() -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(CONFIGS_DIR, "*.py"))
                if os.path.basename(p) != "__init__.py")


def main(argv: list[str]) -> None:
  names = flags_cli.parse(argv, __doc__)
  files = config_files()
  if names:
    by_name = {os.path.splitext(os.path.basename(p))[0]: p for p in files}
    wanted = []
    for name in names:
      key = os.path.splitext(os.path.basename(name))[0]
      if key not in by_name:
        fail(f"no config '{name}' in configs/; configs: {', '.join(sorted(by_name))}.")
      wanted.append(by_name[key])
    files = wanted
  for path in files:
    info = describe(path)
    print(f"configs/{info['name']}: {info['description']}")
    if info["args"]:
      args = ",".join(f"{k}={v}" for k, v in info["args"].items())
      print(f"    args: {args}")
    if info["sweep"]:
      print("    sweep: get_sweep (./launch.sh sweep)")
  print("\nUse: ./launch.sh run configs/NAME.py[:ARG=VALUE,...] [--config.KEY=VALUE ...]; "
        "--print_config shows every key.")


if __name__ == "__main__":
  main(sys.argv)
