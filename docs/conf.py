"""Sphinx configuration (scverse style: myst-nb, book theme, autosummary API reference)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hpvade  # noqa: E402

project = "hpvade"
author = "hpvade developers"
copyright = "2026, hpvade developers"
version = release = hpvade.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# numpydoc-style docstrings through napoleon; types come from the signatures
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
# The tutorial is executed on every build: a notebook that no longer runs fails the docs.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 900
nb_execution_show_tb = True

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute", "generated/*.md"]
templates_path = ["_templates"]

html_theme = "sphinx_book_theme"
html_title = "hpvade"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2}

# The age of every results file, rendered at build time (page "Benchmarks"): a figure's source
# commit and how many library commits came after it.
sys.path.insert(0, str(ROOT / "benchmarks"))
import freshness  # noqa: E402

(ROOT / "docs" / "generated").mkdir(exist_ok=True)
(ROOT / "docs" / "generated" / "freshness.md").write_text(freshness.table())
