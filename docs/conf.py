"""Sphinx configuration for the gifjax documentation.

Build (from the repository root)::

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks are rendered from ``notebooks/*.ipynb`` as stored (never
executed here); the benchmark page includes ``benchmarks/results/SUMMARY.md``
and its plots directly, so neither is copied into ``docs/``.
"""

from __future__ import annotations

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))          # the checkout's gifjax, installed or not
sys.path.insert(0, str(DOCS / "_ext"))  # this site's own small extension

# Importing gifjax for autodoc must not probe for accelerators or grab GPU memory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gifjax  # noqa: E402

# -- project -----------------------------------------------------------------

project = "gifjax"
author = "gifjax developers"
copyright = "gifjax developers"
release = gifjax.__version__
version = release

# -- extensions --------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "gifjax_api",
]

exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- autodoc / napoleon ------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_preserve_defaults = True      # show `key=None`, `Trigger()` as written, not reprs
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False             # "Attributes:" as attribute entries (linkable: Solution.converged)
napoleon_attr_annotations = False     # no annotation types there (they print private paths: jaxlib._jax.Array)
napoleon_use_rtype = False
napoleon_use_admonition_for_examples = False
# The docstrings' "Fields:" sections (frozen config values, dataclasses) read like "Args:".
napoleon_custom_sections = [("Fields", "params_style")]

# Every public module that gets an API page (the list is checked against the
# package at build time: a new public module without a page is a warning).
gifjax_api_modules = [
    "gifjax",
    "gifjax.estimators",
    "gifjax.operators",
    "gifjax.solvers",
    "gifjax.preconditioners",
    "gifjax.curvature",
    "gifjax.masks",
    "gifjax.selection",
    "gifjax.lowrank",
    "gifjax.stepping",
    "gifjax.diagnostics",
    "gifjax.spectrum",
    "gifjax.group",
    "gifjax.sweep",
    "gifjax.parallel",
    "gifjax.evaluation",
    "gifjax.experiments",
    "gifjax.experiments.data",
    "gifjax.experiments.models",
    "gifjax.experiments.train",
    "gifjax.experiments.tasks",
    "gifjax.experiments.tasks.common",
    "gifjax.experiments.tasks.class_removal",
    "gifjax.experiments.tasks.backdoor",
    "gifjax.experiments.demo",
]
# Public by name but not documented on their own: ``python -m gifjax.demo`` is a
# two-line shim for gifjax.experiments.demo (tests/test_api.py: ENTRY_POINTS).
gifjax_api_skip = ["gifjax.demo"]

# -- MyST / notebooks --------------------------------------------------------

nb_execution_mode = "off"             # render notebooks as stored; never run them here
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# -- HTML --------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"gifjax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    "use_download_button": True,
}
html_static_path: list[str] = []
