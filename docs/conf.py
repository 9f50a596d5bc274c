"""Sphinx configuration of the metaflow documentation.

Build from the repository root, offline:

    .venv/bin/sphinx-build -W -b html docs docs/_build

The tutorials in ``notebooks/`` are rendered from the outputs stored in them
(nothing is executed here); they and the committed result plots of
``experiments/`` are copied under ``docs/`` when the build starts, because
Sphinx reads only files below its source folder.
"""

import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# `metaflow`, `tasks` and `launch` from this checkout, as the tests use them.
sys.path.insert(0, str(ROOT))
# autodoc imports metaflow (and jax): no accelerator is needed for that.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _copy_sources() -> None:
  """Notebooks and result plots into the source folder (both gitignored)."""
  notebooks = DOCS / "notebooks"
  shutil.rmtree(notebooks, ignore_errors=True)  # no page of a removed notebook
  notebooks.mkdir()
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copyfile(path, notebooks / path.name)
  figures = DOCS / "figures"
  shutil.rmtree(figures, ignore_errors=True)
  figures.mkdir()
  for path in sorted((ROOT / "experiments").glob("**/*.png")):
    name = "_".join(path.relative_to(ROOT / "experiments").parts)
    shutil.copyfile(path, figures / name)


_copy_sources()

project = "metaflow"
author = "the metaflow authors"
copyright = "the metaflow authors, Apache License 2.0"
release = "0.2.0.dev0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Notebooks: as committed, with their stored outputs.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Docstrings: Google style; `name` in a docstring is a cross-reference where
# Sphinx knows the name, plain code otherwise.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `metaflow.Task` lists what a subclass may set as "Class attributes".
napoleon_custom_sections = [("Class attributes", "params_style")]
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"
autodoc_default_options = {"show-inheritance": False}

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "metaflow"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
}
# Nothing is fetched at build time (no intersphinx): the book theme's
# JavaScript and fonts ship with it.
