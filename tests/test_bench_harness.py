"""Smoke tests of the benchmark harness ``benchmarks/run.py``: its output is well formed.

Nothing here asserts a timing: ``--quick`` runs tiny sizes for 1-2 rounds only to show that
every section, every peer (or its ``skipped`` row) and every output file is produced. They pass
whether or not torch / peft / qwix are installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
SECTIONS = ("step_rank", "step_size", "step_targets", "merge", "mixed", "qlora", "inference")
PLOTS = (
    "step_time_vs_rank.png",
    "step_time_vs_size.png",
    "memory_vs_rank.png",
    "memory_vs_size.png",
    "merge_vs_size.png",
    "mixed_vs_adapters.png",
    "qlora_memory.png",
)
NUM = re.compile(r"^-?\d[\d,]*(\.\d+)?$")


def _have(*mods):
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _run(out, *extra, skip="", env=None):
    env = dict(os.environ, PEFTJAX_BENCH_SKIP=skip, **(env or {}))
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _tables(stdout):
    """``{section key: (headers, rows)}`` parsed from the printed rich (markdown-box) tables."""
    out, key, lines = {}, None, {}
    for line in stdout.splitlines():
        m = re.match(r"=== (?:section: )?(\w+) ===", line)  # a section or the headline
        if m:
            key = m.group(1)
            lines[key] = []
        elif key and line.startswith("|"):
            lines[key].append(line)
    for k, ls in lines.items():
        cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in ls]
        assert len(cells) >= 3, (k, ls)
        assert all(set(c) <= set("-: ") for c in cells[1]), (k, ls[1])  # the separator row
        out[k] = (cells[0], cells[2:])
    return out


def _check_table(key, headers, rows):
    assert rows, key
    for row in rows:
        assert len(row) == len(headers), (key, row)
        if any(c.startswith("skipped (") for c in row):
            continue
        for h, c in zip(headers[1:], row[1:], strict=True):
            assert c == "-" or NUM.match(c), (key, h, c)
            if "÷" in h and c != "-":
                assert float(c.replace(",", "")) > 0, (key, h, c)
        assert any("÷" in h and NUM.match(c) for h, c in zip(headers, row, strict=True)), (key, row)


def _rows_by_entry(rows):
    return {r[0] for r in rows}


@pytest.mark.slow
def test_quick_run_tables_plots_and_results(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# peftjax benchmark results\n\nKEEP: hand-written text\n")
    stdout = _run(tmp_path)
    tables = _tables(stdout)
    assert set(SECTIONS) <= set(tables), sorted(tables)
    for k in SECTIONS:
        _check_table(k, *tables[k])

    headers, rows = tables["step_rank"]
    ratio = headers.index("÷ peftjax (median)")
    entries = _rows_by_entry(rows)
    for name in ("full fine-tune", "peftjax LoRA", "naive W + s·A·B", "flax.nnx.LoRALinear"):
        assert name in entries, entries
    for r in rows:  # peftjax is the reference of every point
        if r[0] == "peftjax LoRA":
            assert r[ratio] == "1.00", r
    assert len({r[1] for r in rows if r[0] == "peftjax LoRA"}) >= 2  # at least two ranks
    sizes = {r[2] for r in tables["step_size"][1] if r[0] == "peftjax LoRA"}
    assert len(sizes) >= 2  # at least two widths
    by_set = {r[0]: r for r in tables["step_targets"][1]}  # "<entry> · <target set>"
    for tset in ("attention", "mlp", "all-linear"):
        assert by_set[f"peftjax LoRA · {tset}"][ratio] == "1.00", tset  # its own reference
        assert f"full fine-tune · {tset}" in by_set and f"naive W + s·A·B · {tset}" in by_set
    for name, mods in (("HF PEFT (torch CPU)", ("torch", "peft")), ("qwix LoRA", ("qwix",))):
        row = next(r for r in rows if r[0] == name)
        if _have(*mods):
            assert NUM.match(row[ratio]), row
        else:
            assert row[1] == "skipped (not installed)", row
    _check_table("headline", *tables["headline"])
    ran = {r[0] for r in rows if not r[1].startswith("skipped")}
    assert {r[0] for r in tables["headline"][1]} == ran

    for p in PLOTS:
        data = (tmp_path / "plots" / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- run.py:begin -->") == 1 and text.count("<!-- run.py:end -->") == 1
    assert text.index("<!-- run.py:end -->") < text.index("KEEP: hand-written text")
    assert text.startswith("# peftjax benchmark results")
    for frag in ("Machine:", "Versions:", "jax ", "side by side", "plots/step_time_vs_rank.png"):
        assert frag in text, frag
    block = text[: text.index("<!-- run.py:end -->")]
    assert block.count("\n### ") == len(SECTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["env", "not installed"])
def test_skipped_peers_are_rows_not_crashes(tmp_path, how):
    if how == "env":
        stdout = _run(tmp_path / "out", "--sections", "merge,inference", skip="torch,qwix")
        why = "skipped (PEFTJAX_BENCH_SKIP)"
    else:  # a `torch` whose import fails, first on the path: as if torch were not installed
        fake = tmp_path / "fake" / "torch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
        path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
        stdout = _run(tmp_path / "out", "--sections", "merge,inference", env={"PYTHONPATH": path})
        why = "skipped (not installed)"
    tables = _tables(stdout)
    assert set(tables) == {"merge", "inference"}
    for k, (headers, rows) in tables.items():
        _check_table(k, headers, rows)
        hf = [r for r in rows if r[0].startswith("HF PEFT")]
        assert hf and all(r[1] == why for r in hf), (k, hf)
        assert any(r[0].startswith("peftjax") and NUM.match(r[1]) for r in rows), (k, rows)
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert plots == ["merge_vs_size.png"]


def test_results_block_replaces_itself_and_keeps_the_rest(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    run = importlib.util.module_from_spec(spec)
    saved_path, saved_mods = list(sys.path), set(sys.modules)
    sys.modules["bench_run"] = run  # dataclasses look their module up
    try:
        with warnings.catch_warnings():  # _common silences warnings globally
            spec.loader.exec_module(run)
    finally:  # leave no benchmarks/ module or path behind for the other tests
        sys.path[:] = saved_path
        for m in ("bench_run", "_common", "step_time"):
            if m not in saved_mods:
                sys.modules.pop(m, None)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Title\n\n## Hand-written\n\nkeep me\n")
    run.write_results(path, f"{run.BEGIN}\nfirst\n{run.END}\n")
    run.write_results(path, f"{run.BEGIN}\nsecond\n{run.END}\n")
    text = path.read_text()
    assert text.startswith("# Title\n")
    assert "second" in text and "first" not in text
    assert text.count(run.BEGIN) == 1 and text.count(run.END) == 1
    assert text.index(run.END) < text.index("## Hand-written") and text.endswith("keep me\n")
    new = tmp_path / "new" / "RESULTS.md"
    new.parent.mkdir()
    run.write_results(new, f"{run.BEGIN}\nx\n{run.END}\n")
    assert new.read_text().startswith("# peftjax benchmark results\n")
