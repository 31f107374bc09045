"""Sphinx configuration: the API reference is rendered from the docstrings (autodoc + napoleon for
their Google-style ``Args:`` sections); the guides are the README's own sections, included with
MyST so the README stays the one copy. Build: ``sphinx-build -W -b html docs docs/_build/html``."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, also when it is not installed

import stiefel_sct  # noqa: E402

project = "stiefel-sct"
author = "the stiefel-sct developers"
copyright = "2026, the stiefel-sct developers"
release = stiefel_sct.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"  # the signature line stays readable; types go beside each argument
autodoc_inherit_docstrings = False  # torch.optim.Optimizer's docstrings are not ours to render
autodoc_mock_imports = ["transformers"]  # stiefel_sct.hf needs it only when used
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
myst_heading_anchors = 3
# README links point at files of the checkout (paper/README.md, benchmarks/...), not at doc pages
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = f"stiefel-sct {release}"
