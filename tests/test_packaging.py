"""What a user's environment gets: the engine imports alone, and the
dependency ranges of pyproject.toml admit the versions constraints.txt pins
(and this environment was installed with); and the package's shape: no
import cycle, no module over 450 lines, no class over 300."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import metaflow
from tests import import_graph

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINING_ONLY = ("orbax", "grain", "clu", "tensorboardX")


@pytest.mark.subprocess
def test_engine_imports_without_the_training_stack():
  # A fresh process: this one has imported the trainer long ago.
  script = textwrap.dedent(f"""
      import sys
      import jax.numpy as jnp
      import optax
      import metaflow.unroll
      from metaflow import Strategy, meta_value_and_grad
      fn = meta_value_and_grad(
          lambda theta, eta, x: jnp.sum((theta * eta - x) ** 2),
          lambda theta, eta, x: jnp.sum((theta - x) ** 2),
          optax.sgd(0.1), 2, strategy=Strategy("mixflow"))
      value, grad = fn(jnp.ones(3), jnp.zeros(3), jnp.ones((2, 3)),
                       jnp.ones(3))
      assert grad.shape == (3,) and jnp.isfinite(value)
      print(sorted(m for m in sys.modules
                   if m.split(".")[0] in {_TRAINING_ONLY!r}))
      """)
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=_REPO_ROOT, capture_output=True,
      text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_every_public_name_resolves_including_the_lazy_ones():
  for name in metaflow.__all__:
    assert getattr(metaflow, name) is not None, name
  from metaflow import checkpoint, trainer
  assert metaflow.BilevelTrainer is trainer.BilevelTrainer
  assert metaflow.TrainState is trainer.TrainState
  assert (metaflow.IncompatibleCheckpointError
          is checkpoint.IncompatibleCheckpointError)
  assert {"BilevelTrainer", "metrics", "meta_value_and_grad"} <= set(
      dir(metaflow))
  with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
    metaflow.Trainer  # noqa: B018


def _pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(_REPO_ROOT, "constraints.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
  return pins


def _requirements() -> list[Requirement]:
  with open(os.path.join(_REPO_ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  specs = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    specs.extend(extra)
  return [Requirement(spec) for spec in specs]


def test_ranges_admit_the_pinned_versions_which_are_installed():
  pins = _pins()
  for requirement in _requirements():
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
    assert requirement.specifier.contains(pins[name]), (
        f"pyproject.toml's {requirement} excludes the pinned {pins[name]}")
    # This environment was installed with the constraints (README, .ci/run).
    assert importlib.metadata.version(name) == pins[name], name


def test_the_package_stays_in_small_pieces():
  """Data flows one way through metaflow/ (its imports have no cycle) and
  each module holds one concept: at most 450 lines a module, 300 a class
  (`tests/import_graph.py` prints the layers and the largest)."""
  assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
                             ) == [["a", "b", "c"]]
  edges = import_graph.graph()
  assert "metaflow.trainer" in edges and "metaflow.estimators.base" in edges
  assert import_graph.cycles(edges) == []
  modules, classes = import_graph.sizes()
  assert {m: n for m, n in modules.items() if n > 450} == {}
  assert {c: n for c, n in classes.items() if n > 300} == {}


def test_the_example_text_is_package_data():
  from fnmatch import fnmatch

  from metaflow import data
  path = data.bundled_path("tinyshakespeare.txt")
  assert os.path.getsize(path) == 1115394
  package = os.path.dirname(os.path.abspath(metaflow.__file__))
  relative = os.path.relpath(path, package)
  assert not relative.startswith(os.pardir)  # inside the package
  with open(os.path.join(_REPO_ROOT, "pyproject.toml"), "rb") as f:
    globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["metaflow"]
  assert any(fnmatch(relative, g) for g in globs), (relative, globs)
  with pytest.raises(ValueError, match="no bundled data file 'x.txt'"):
    data.bundled_path("x.txt")


def test_nothing_reads_a_path_outside_the_repository():
  """The shipped code, tests and notebooks name no folder beside the
  repository (a user's clone has none; the changelog may say where the
  data used to be)."""
  tracked = subprocess.run(["git", "ls-files"], cwd=_REPO_ROOT,
                           capture_output=True, text=True).stdout.split()
  needles = (os.pardir + "/" + "shared", '"shared", ' + '"data"')
  outside = []
  for name in tracked:
    if not name.endswith((".py", ".ipynb", ".toml")):  # what reads files
      continue
    with open(os.path.join(_REPO_ROOT, name), encoding="utf-8") as f:
      text = f.read()
    if any(needle in text for needle in needles):
      outside.append(name)
  assert not outside, outside
