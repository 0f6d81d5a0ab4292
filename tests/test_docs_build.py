"""The documentation site (docs/) builds with warnings as errors, has every page it promises, and
its examples run.

The build is a subprocess, as CI and a reader run it (`python -m sphinx -W --keep-going -b html
docs <out>`): a broken cross-reference, a docstring that does not parse, a notebook that does not
render or a config field without a documented meaning fails it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peftjax
from peftjax.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _sphinx(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    cmd += ["-d", str(out / "doctrees"), *extra, str(src), str(out / "html")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_every_method_has_a_page_with_its_field_table():
    """Fast: one page per registry row (plus modules_to_save), each rendering its config's
    table through the ``config-fields`` directive, and all of them in the methods toctree."""
    index = (DOCS / "methods" / "index.md").read_text()
    for name, method in METHODS.items():
        page = DOCS / "methods" / f"{name}.md"
        assert page.is_file(), f"no docs page for method {name!r}"
        text = page.read_text()
        directive = f"```{{config-fields}} peftjax.{method.config.__name__}"
        assert directive in text, f"{page.name} lacks the field table of {method.config.__name__}"
        assert re.search(rf"^{name}$", index, flags=re.M), f"{name} not in methods/index.md"
        assert _python_blocks(page), f"{page.name} has no example"
    assert (DOCS / "methods" / "modules_to_save.md").is_file()


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    """The site builds with -W; the key pages, every API anchor and every notebook exist."""
    r = _sphinx(DOCS, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    html = tmp_path / "html"
    for page in ["index", "getting_started", "api", "coming_from_hf_peft", "coming_from_qwix_nnx"]:
        assert (html / f"{page}.html").is_file(), page
    for name in [*METHODS, "index", "modules_to_save"]:
        assert (html / "methods" / f"{name}.html").is_file(), name

    api = (html / "api.html").read_text()
    anchors = set(re.findall(r'id="peftjax\.([A-Za-z_0-9]+)"', api))
    missing = sorted(set(peftjax.__all__) - anchors)
    assert not missing, f"names of peftjax.__all__ without an API entry: {missing}"
    assert 'id="peftjax.inject"' in api and "Add adapter" in api  # the docstring, rendered

    # each method page renders the formula and a row for every config field
    for name, method in METHODS.items():
        text = (html / "methods" / f"{name}.html").read_text()
        assert 'class="math' in text, f"{name}: no formula rendered"
        for field in (f.name for f in dataclasses.fields(method.config)):
            assert f'<span class="pre">{field}</span>' in text, f"{name}: field {field} missing"

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        page = html / "notebooks" / f"{nb.stem}.html"
        assert page.is_file(), f"{nb.name} not rendered"
        assert "cell_input" in page.read_text(), f"{nb.name}: no code cell rendered"
    index = (html / "notebooks" / "index.html").read_text()
    assert all(f"{nb.stem}.html" in index for nb in notebooks)


@pytest.mark.slow
def test_a_field_without_a_meaning_fails_the_build(tmp_path):
    """The ``config-fields`` directive turns drift between a config class and its docs page
    (an undocumented field, a documented name that is not a field) into a build error."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "extensions = ['myst_parser', 'peftjax_docs']\n"
    )
    (src / "index.md").write_text(
        "# t\n\n```{config-fields} peftjax.IA3Config\n"
        "init_ia3_weights: ones.\nnot_a_field: x.\n```\n"
    )
    r = _sphinx(src, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "no meaning for field 'feedforward_modules' of IA3Config" in out, out
    assert "'not_a_field' is not a field of IA3Config" in out, out


_EXAMPLE_PAGES = sorted((DOCS / "methods").glob("*.md")) + [
    DOCS / "index.md",
    DOCS / "getting_started.md",
    DOCS / "coming_from_qwix_nnx.md",
]


@pytest.mark.slow
@pytest.mark.parametrize("page", _EXAMPLE_PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_docs_examples_run_as_written(page, tmp_path, monkeypatch):
    """Every python block of the page runs, in order, in one namespace, in a fresh cwd."""
    blocks = _python_blocks(page)
    if page.name == "index.md" and page.parent.name == "methods":
        assert not blocks
        return
    assert blocks, f"{page.name}: no python block"
    source = "\n".join(blocks)
    if "transformers" in source:
        pytest.importorskip("transformers")
    if "qwix" in source:
        pytest.importorskip("qwix")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name} python block {i}", "exec"), ns)
