"""Sphinx configuration of peftjax's documentation site (Sphinx + myst-nb + furo).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``. Nothing here needs the
network. The notebooks live in ``../notebooks/``; at build time they are copied into the
git-ignored ``docs/notebooks/`` with a generated index page, and rendered without being executed
(``tests/test_notebooks.py`` executes them).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # autodoc reads the working tree's peftjax
sys.path.insert(0, str(DOCS / "_ext"))

import peftjax  # noqa: E402

project = "peftjax"
author = "peftjax contributors"
copyright = "peftjax contributors"
release = version = peftjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
    "peftjax_docs",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# `x` in docstrings is inline code (the docstrings use Markdown-style backticks).
default_role = "code"

# autodoc / napoleon: Google-style docstrings, signatures as written
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# defaults as written in the source (`dtype=jnp.float32`, not `<class ...>`)
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# MyST: formulas ($...$, $$...$$, amsmath environments), definition lists, heading anchors
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# myst-nb: render the notebooks as stored, never execute them here
nb_execution_mode = "off"
nb_merge_streams = True

html_theme = "furo"
html_title = f"peftjax {release}"
html_static_path: list[str] = []


def _copy_notebooks() -> None:
    """Copies ``../notebooks/*.ipynb`` into ``docs/notebooks/`` and writes its index page.

    The folder is regenerated on every build (stale copies of removed notebooks are dropped);
    whatever notebooks exist are listed, in name order.
    """
    src = ROOT / "notebooks"
    dst = DOCS / "notebooks"
    notebooks = sorted(src.glob("*.ipynb")) if src.is_dir() else []
    dst.mkdir(exist_ok=True)
    keep = {nb.name for nb in notebooks} | {"index.md"}
    for old in dst.iterdir():
        if old.name not in keep:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    for nb in notebooks:
        target = dst / nb.name
        data = nb.read_bytes()
        if not target.exists() or target.read_bytes() != data:  # keep mtimes: no needless rebuild
            target.write_bytes(data)
    lines = [
        "# Notebooks",
        "",
        "The notebooks of the repository's `notebooks/` folder, shown as stored (the test suite",
        "executes every one of them: `tests/test_notebooks.py`). Run them locally with",
        '`pip install -e ".[notebooks]"` and Jupyter.',
        "",
    ]
    if notebooks:
        lines += ["```{toctree}", ":maxdepth: 1", ""] + [nb.stem for nb in notebooks] + ["```"]
    else:
        lines += ["There are no notebooks in this checkout yet."]
    index = dst / "index.md"
    text = "\n".join(lines) + "\n"
    if not index.exists() or index.read_text() != text:
        index.write_text(text)


_copy_notebooks()
