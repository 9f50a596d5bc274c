"""The shape of the `metaflow` package, read from its source (nothing is
imported): which module imports which, whether any import cycle exists,
the layers that the imports order the modules into, and the size of every
module and class.

    python -m tests.import_graph [REPO]   # the layers (ARCHITECTURE.md), sizes

Imports under ``if TYPE_CHECKING:`` are for type checkers only and are not
edges; imports inside functions are (they run). The package's own
``__init__`` (the public names, re-exported) is not a node: ``from metaflow
import x`` is an edge to the module ``metaflow.x``. A sub-package's
``__init__`` is a node that imports its modules.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = "metaflow"


def module_files(repo: str = REPO) -> dict[str, str]:
  """``{module name: path}`` of every module of the package (in the
  checkout ``repo``) but its root ``__init__``."""
  found = {}
  for folder, _, files in os.walk(os.path.join(repo, ROOT)):
    for file in sorted(files):
      if not file.endswith(".py"):
        continue
      path = os.path.join(folder, file)
      parts = os.path.relpath(path, repo)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      name = ".".join(parts)
      if name != ROOT:
        found[name] = path
  return found


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, known: set[str]) -> set[str]:
  edges: set[str] = set()

  def visit(node):
    if isinstance(node, ast.If) and _is_type_checking(node):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      edges.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == ROOT:
        edges.update(f"{ROOT}.{a.name}" for a in node.names
                     if f"{ROOT}.{a.name}" in known)
      elif node.module in known:
        edges.add(node.module)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return edges


def graph(repo: str = REPO) -> dict[str, set[str]]:
  """``{module: the package's modules it imports}``."""
  files = module_files(repo)
  known = set(files)
  result = {}
  for name, path in files.items():
    with open(path) as f:
      result[name] = _imports(ast.parse(f.read()), known) - {name}
  return result


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles (strongly connected components of more than one
  module), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        connect(w)
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
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      connect(v)
  return found


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
  """Modules by layer: layer 0 imports none of the package, layer k
  imports only modules of layers below k (and at least one of k - 1)."""
  depth: dict[str, int] = {}

  def of(v):
    if v not in depth:
      depth[v] = 1 + max((of(w) for w in edges[v]), default=-1)
    return depth[v]

  for v in edges:
    of(v)
  result = [[] for _ in range(max(depth.values()) + 1)]
  for v in sorted(depth):
    result[depth[v]].append(v)
  return result


def sizes(repo: str = REPO) -> tuple[dict[str, int], dict[str, int]]:
  """``({module: lines}, {module.Class: lines})`` of the package."""
  modules, classes = {}, {}
  for name, path in module_files(repo).items():
    with open(path) as f:
      text = f.read()
    modules[name] = len(text.splitlines())
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.ClassDef):
        classes[f"{name}.{node.name}"] = (node.end_lineno or node.lineno) \
            - node.lineno + 1
  return modules, classes


def main(repo: str = REPO) -> None:
  edges = graph(repo)
  for k, layer in enumerate(layers(edges)):
    print(f"layer {k}: {', '.join(m[len(ROOT) + 1:] for m in layer)}")
  print("cycles:", cycles(edges) or "none")
  modules, classes = sizes(repo)
  for what, table in (("modules", modules), ("classes", classes)):
    largest = sorted(table.items(), key=lambda kv: -kv[1])[:5]
    print(f"largest {what}: "
          + ", ".join(f"{name} {lines}" for name, lines in largest))


if __name__ == "__main__":
  main(*sys.argv[1:])
