"""The tiers of the suite: every marker the tests use is registered (the
suite runs with ``--strict-markers``), and every test module keeps at least
one test outside ``slow``, so that the fast tier (``pytest -m "not slow"``)
still exercises every module's subject.

The test modules are parsed, not imported: a test is slow when its module's
``pytestmark``, its class's or its own decorators carry ``pytest.mark.slow``,
or when every case of one of its ``parametrize`` lists is a
``pytest.param(..., marks=...slow...)``.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

TESTS = pathlib.Path(__file__).resolve().parent
PYPROJECT = TESTS.parent / "pyproject.toml"
TIERS = {"slow", "subprocess", "mesh", "notebook"}


def _modules() -> list[pathlib.Path]:
  return sorted(TESTS.glob("test_*.py"))


def _mark_names(node: ast.AST) -> set[str]:
  """Names X of every ``pytest.mark.X`` (or ``mark.X``) inside ``node``."""
  names = set()
  for sub in ast.walk(node):
    if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute)
        and sub.value.attr == "mark"):
      names.add(sub.attr)
    elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
          and sub.value.id == "mark"):
      names.add(sub.attr)
  return names


def _direct_marks(decorators) -> set[str]:
  """Marks a list of decorators (or a ``pytestmark`` value) puts on a test,
  leaving out those inside ``parametrize``'s cases."""
  names = set()
  for node in decorators:
    if isinstance(node, ast.Call) and _mark_names(node.func) == {"parametrize"}:
      continue
    items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    for item in items:
      target = item.func if isinstance(item, ast.Call) else item
      names |= _mark_names(target)
  return names


def _all_cases_slow(decorator) -> bool:
  """Whether ``decorator`` is a ``parametrize`` whose cases (a literal list)
  are all ``pytest.param(..., marks=<slow>)``."""
  if not (isinstance(decorator, ast.Call)
          and _mark_names(decorator.func) == {"parametrize"}
          and len(decorator.args) >= 2
          and isinstance(decorator.args[1], (ast.List, ast.Tuple))
          and decorator.args[1].elts):
    return False
  for case in decorator.args[1].elts:
    marks = [k.value for k in getattr(case, "keywords", ()) if k.arg == "marks"]
    if not (isinstance(case, ast.Call) and marks
            and "slow" in _mark_names(marks[0])):
      return False
  return True


def _module_marks(tree: ast.Module) -> set[str]:
  for node in tree.body:
    if (isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                for t in node.targets)):
      return _direct_marks([node.value])
  return set()


def _tests(tree: ast.Module):
  """(name, whether slow) of each test function and method of a module."""
  module_slow = "slow" in _module_marks(tree)

  def visit(body, inherited):
    for node in body:
      if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
        class_slow = inherited or "slow" in _direct_marks(node.decorator_list)
        for own in node.body:
          if (isinstance(own, ast.Assign) and any(
              isinstance(t, ast.Name) and t.id == "pytestmark"
              for t in own.targets)):
            class_slow = class_slow or "slow" in _direct_marks([own.value])
        yield from visit(node.body, class_slow)
      elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test")):
        slow = (inherited or "slow" in _direct_marks(node.decorator_list)
                or any(_all_cases_slow(d) for d in node.decorator_list))
        yield node.name, slow
  return list(visit(tree.body, module_slow))


def _parse(path: pathlib.Path) -> ast.Module:
  return ast.parse(path.read_text(), filename=str(path))


def test_tier_markers_are_registered_and_strict():
  with open(PYPROJECT, "rb") as f:
    options = tomllib.load(f)["tool"]["pytest"]["ini_options"]
  assert "--strict-markers" in options["addopts"].split()
  registered = {line.split(":")[0].split("(")[0].strip()
                for line in options["markers"]}
  assert TIERS <= registered, TIERS - registered


def test_every_marker_used_is_registered(request):
  """Every ``pytest.mark.X`` in tests/ is one pytest knows (its own, a
  plugin's such as pytest-xdist's ``xdist_group``, or pyproject.toml's)."""
  known = {line.split(":")[0].split("(")[0].strip()
           for line in request.config.getini("markers")}
  unknown = {}
  for path in sorted(TESTS.glob("*.py")):
    for name in _mark_names(_parse(path)) - known:
      unknown.setdefault(name, []).append(path.name)
  assert not unknown, f"unregistered markers (add them to pyproject.toml's " \
      f"[tool.pytest.ini_options] markers): {unknown}"


def test_every_module_has_a_fast_test():
  modules = _modules()
  assert len(modules) > 20 and pathlib.Path(__file__) in modules
  all_slow = []
  for path in modules:
    tests = _tests(_parse(path))
    assert tests, f"{path.name} has no test functions the parser sees"
    if all(slow for _, slow in tests):
      all_slow.append(path.name)
  assert not all_slow, (
      "every test of these modules is marked slow, so `pytest -m 'not slow'` "
      f"no longer covers them: {all_slow}")


def test_the_parser_sees_marks_as_pytest_does(tmp_path):
  """The rules above on a module written for the purpose: module, class,
  decorator and parametrize-case marks."""
  source = '''
from pytest import mark

pytestmark = [pytest.mark.mesh]

@pytest.mark.slow
def test_a():
  pass

@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(2, marks=[mark.slow])])
def test_b(x):
  pass

@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_c(x):
  pass

@pytest.mark.slow
class TestD:
  def test_e(self):
    pass

def helper():
  pass
'''
  tree = ast.parse(source)
  assert _tests(tree) == [("test_a", True), ("test_b", True),
                          ("test_c", False), ("test_e", True)]
  assert _module_marks(tree) == {"mesh"}
  assert _mark_names(tree) == {"mesh", "slow", "parametrize"}
  slow_module = ast.parse("import pytest\npytestmark = pytest.mark.slow\n"
                          "def test_f():\n  pass\n")
  assert _tests(slow_module) == [("test_f", True)]

