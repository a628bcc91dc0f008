"""The import graph: no cycles among the project's modules, and each layer of
`multimodal/` imports only from the layers below it (docs/architecture.md).

Imports inside functions count (both cycles this test was written for went
through such imports), and so do the "module:Class" strings of lazy tables
such as `multimodal/tasks/__init__.py`'s, which importlib resolves.
"""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("multimodal", "experiments", "configs")

# Lowest first. A package imports from its own layer's other packages only
# where no cycle results (the cycle test), and never from a higher layer.
LAYERS = (
    ("multimodal.config",),
    ("multimodal.data", "multimodal.models", "multimodal.diffusion", "multimodal.parallel"),
    ("multimodal.importers", "multimodal.evaluators", "multimodal.perf"),
    ("multimodal.train",),
    ("multimodal.tasks",),
    ("multimodal.eval_suite", "multimodal.sweep"),
    ("experiments", "configs"),
)
_LAZY_TABLE_ENTRY = re.compile(r"^((?:multimodal|experiments)(?:\.\w+)+):\w+$")


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      modules[name.removesuffix(".__init__")] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports anywhere in its source."""
  modules = _modules()

  def project_module(name: str) -> str | None:
    return name if name in modules else None

  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = name.split(".")[:len(name.split(".")) - node.level + is_package]
          base = ".".join(parts + ([base] if base else []))
        for alias in node.names:
          # `from pkg import mod` depends on mod; `from mod import name` on mod.
          deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = _LAZY_TABLE_ENTRY.match(node.value)
        if match:
          deps.add(match.group(1))
    graph[name] = {d for d in map(project_module, deps) if d and d != name}
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def layer_of(module: str) -> int | None:
  for level, packages in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in packages):
      return level
  return None


def test_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_each_layer_imports_only_from_lower_layers():
  upward = []
  for module, deps in import_graph().items():
    for dep in deps:
      if layer_of(dep) is not None and layer_of(module) is not None \
         and layer_of(dep) > layer_of(module):
        upward.append(f"{module} -> {dep}")
  assert not upward, "imports from a higher layer: " + ", ".join(sorted(upward))


def test_every_package_has_a_layer():
  packages = {m for m, path in _modules().items() if path.name == "__init__.py"}
  assert not [p for p in packages if p != "multimodal" and layer_of(p) is None]


def test_the_checker_finds_a_cycle_through_a_function_level_import():
  # A check that cannot fail would prove nothing: feed it the shape of the
  # config <-> checks cycle it was written for.
  graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
  assert find_cycles(graph) == [["a", "b"]]
  source = "def f():\n  from multimodal.train import trainer\n"
  deps = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
  assert deps and deps[0].module == "multimodal.train"


def test_parsing_a_config_imports_neither_tensorflow_nor_jax():
  # What a typo's error waits for: parse, override and check a config.
  code = (
      "import sys\n"
      "from multimodal.config import config_lib\n"
      "from multimodal.tasks import config_checks\n"
      "config = config_lib.load_config_file('configs/clip_shapes.py')\n"
      "config_checks.check(config)\n"
      "heavy = sorted(m for m in ('tensorflow', 'jax', 'torch') if m in sys.modules)\n"
      "print(heavy)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "[]", out
