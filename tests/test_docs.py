"""The documentation's sources: the API reference names every public name,
and the notebooks the site renders carry their outputs.

Nothing is built here (``sphinx-build -W`` in ``.ci/run`` does that); these
checks read the Markdown and notebook files only.
"""

import importlib
import pathlib
import re

import nbformat
import pytest

import metaflow

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGES = sorted((ROOT / "docs").glob("api*.md")) + sorted(
    (ROOT / "docs").glob("api*.rst"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# ``.. autoclass:: metaflow.Task`` (reStructuredText, also inside MyST's
# eval-rst blocks) or ``{autoclass} metaflow.Task`` (a MyST directive).
_DIRECTIVE = re.compile(
    r"^\s*(?:\.\.\s+auto\w+::|```+\s*\{auto\w+\})\s*([\w.]+)", re.MULTILINE)


def documented_names(text: str) -> set[str]:
  """The objects the autodoc directives of a page's source document."""
  return set(_DIRECTIVE.findall(text))


def test_directives_are_parsed():
  text = ("```{eval-rst}\n.. autoclass:: metaflow.Task\n   :members:\n"
          ".. automodule:: metaflow.optim\n```\n"
          "```{autofunction} metaflow.inner_loop\n```\n"
          "metaflow.register in prose is not a directive\n")
  assert documented_names(text) == {"metaflow.Task", "metaflow.optim",
                                    "metaflow.inner_loop"}


def test_every_public_name_is_in_the_api_reference():
  assert API_PAGES, "docs/api*.md: no API reference pages"
  documented = set()
  for page in API_PAGES:
    documented |= documented_names(page.read_text())
  missing = [name for name in metaflow.__all__
             if f"metaflow.{name}" not in documented]
  assert not missing, (
      f"not in the API reference ({', '.join(p.name for p in API_PAGES)}): "
      f"{', '.join(missing)}; add an autodoc directive for each")


def test_api_reference_documents_only_what_exists():
  """A directive for a name that is gone would fail the Sphinx build late;
  say which here."""
  stale = [f"{page.name}: {target}" for page in API_PAGES
           for target in documented_names(page.read_text())
           if not _resolves(target)]
  assert not stale, stale


def _resolves(target: str) -> bool:
  """Whether ``package.module.Name`` names an object (its module imported)."""
  parts = target.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    for part in parts[split:]:
      if not hasattr(obj, part):
        return False
      obj = getattr(obj, part)
    return True
  return False


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_stored_outputs(path):
  """The site renders notebooks from their stored outputs (myst-nb with
  execution off): every code cell was run, in order, without an error, and
  the notebook shows what it computed."""
  notebook = nbformat.read(path, as_version=4)
  cells = [cell for cell in notebook.cells
           if cell.cell_type == "code" and cell.source.strip()]
  assert cells, f"{path.name} has no code cells"
  counts = [cell.execution_count for cell in cells]
  not_run = [i for i, count in enumerate(counts) if count is None]
  assert not not_run, (
      f"{path.name}: code cells {not_run} were not run; execute the notebook"
      " and save its outputs (docs/contributing.md)")
  assert counts == sorted(counts), f"{path.name}: cells run out of order"
  errors = [output.get("ename") for cell in cells for output in cell.outputs
            if output.output_type == "error"]
  assert not errors, f"{path.name}: stored errors {errors}"
  assert any(cell.outputs for cell in cells), f"{path.name}: no outputs"
