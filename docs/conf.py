"""Sphinx configuration: the Markdown pages (MyST) and the API reference generated from the docstrings.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``pip install -e '.[docs]'``);
CI builds it with warnings as errors.
"""

project = "adapter-fused"
author = "adapter-fused developers"
copyright = "2026, adapter-fused developers"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
nitpicky = False
html_theme = "alabaster"
