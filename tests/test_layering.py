"""Import layering of the qsft_jax package: no import cycles between its modules.

Every module's imports are read with `ast` (module level, function level and under TYPE_CHECKING
alike: an import moved into a function still ties the two modules together), resolved to qsft_jax
modules, and the graph is searched for cycles. `from pkg import name` counts as an import of the
submodule pkg.name when that file exists, else of the package pkg (its __init__). Importing a
submodule also runs its parent packages' __init__ files; those implicit edges are not counted, since
a package __init__ that re-exports its submodules is the usual layout, not a cycle.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "qsft_jax"
REPO = pathlib.Path(__file__).resolve().parents[1]


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package under `root`."""
  files = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    files[".".join(parts)] = path
  return files


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """Absolute dotted name that `from <node.module> import ...` (possibly relative) refers to."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the qsft_jax modules it imports anywhere in its source."""
  files = module_files(root)
  graph: dict[str, set[str]] = {name: set() for name in files}
  for name, path in files.items():
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        source = _resolve(name, is_package, node)
        for alias in node.names:
          sub = f"{source}.{alias.name}"
          targets.append(sub if sub in files else source)
      for target in targets:
        if target in files and target != name:
          graph[name].add(target)
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a list of modules, the first repeated at the end) per strongly connected component
  with more than one module (Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def visit(v: str):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
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
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)

  cycles = []
  for component in components:
    members = set(component)
    start = component[0]
    # Breadth-first search inside the component for the shortest path back to `start`.
    parents: dict[str, str] = {}
    frontier = [start]
    found = None
    while frontier and found is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & members):
          if w == start:
            found = v
            break
          if w not in parents:
            parents[w] = v
            nxt.append(w)
        if found is not None:
          break
      frontier = nxt
    path = [found]
    while path[-1] != start:
      path.append(parents[path[-1]])
    cycles.append(list(reversed(path)) + [start])
  return cycles


def test_finds_a_cycle_and_its_path(tmp_path):
  # A three-module cycle through a function-level and a relative import, and a package __init__
  # re-exporting its submodule (not a cycle).
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from qsft_jax import b\n")
  (pkg / "b.py").write_text("def f():\n  from qsft_jax.sub import c\n")
  (pkg / "sub" / "__init__.py").write_text("from qsft_jax.sub.c import g\n")
  (pkg / "sub" / "c.py").write_text("from .. import a\ndef g():\n  pass\n")
  (pkg / "d.py").write_text("import qsft_jax.sub.c\n")
  graph = import_graph(tmp_path)
  assert graph["qsft_jax.sub.c"] == {"qsft_jax.a"}
  assert graph["qsft_jax.sub"] == {"qsft_jax.sub.c"}
  assert find_cycles(graph) == [["qsft_jax.a", "qsft_jax.b", "qsft_jax.sub.c", "qsft_jax.a"]]
  (pkg / "sub" / "c.py").write_text("def g():\n  pass\n")
  assert find_cycles(import_graph(tmp_path)) == []


def test_no_import_cycles_between_qsft_jax_modules():
  cycles = find_cycles(import_graph(REPO))
  if cycles:
    pytest.fail("import cycles between qsft_jax modules:\n" +
                "\n".join("  " + " -> ".join(cycle) for cycle in cycles))


def test_sharding_does_not_import_the_models():
  graph = import_graph(REPO)
  models = sorted(m for m in graph["qsft_jax.sharding"] if m.startswith("qsft_jax.models"))
  assert not models, f"qsft_jax.sharding imports {models}"
