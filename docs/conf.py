"""Sphinx configuration: the Markdown pages (MyST) and the API reference generated from the docstrings.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``pip install -e '.[docs]'``);
CI builds it with warnings as errors.
"""

import re

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

# The docstrings describe arguments and fields as "name: what it is", continued on indented lines; shown
# as a list, each name as code.
FIELD = re.compile(r"^([A-Za-z_]\w*(?:(?: / |, )[A-Za-z_]\w*)*): (.*)$")


def fields_as_lists(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    """autodoc-process-docstring: "name: text" lines and their indented continuations become list items."""
    out: list[str] = []
    in_list = False
    for line in lines:
        match = FIELD.match(line)
        if match:
            if not in_list and out and out[-1].strip():
                out.append("")
            out.append(f"- ``{match[1]}``: {match[2]}")
            in_list = True
        elif in_list and line.startswith(" ") and line.strip():
            out.append("  " + line.strip())
        else:
            if in_list and line.strip():
                out.append("")
            in_list = False
            out.append(line)
    lines[:] = out


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-docstring", fields_as_lists)
