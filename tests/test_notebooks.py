"""The notebooks in ``notebooks/`` run, so they never rot, and are committed stripped.

Each notebook is executed top to bottom with nbclient in a fresh ``python3`` kernel (ipykernel's
own kernelspec), from the ``notebooks/`` folder, with matplotlib's non-interactive backend; a
cell that raises (the notebooks ``assert`` what they claim) fails the test, naming the notebook
and the cell. Executing is slow (a kernel start and a few JAX compilations each), so those tests
are marked slow; the check that every notebook is stored without outputs (``nbstripout``),
valid and with the ``python3`` kernel runs by default.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat  # the test extra installs it: a missing install fails, never skips
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _kernel_env() -> dict[str, str]:
    """The environment of a user's fresh kernel: ``MPLBACKEND=Agg`` (plots render to files, no
    display), and without the 8 simulated devices `tests/conftest.py` forces on this process
    (a notebook that wants a mesh sets ``XLA_FLAGS`` itself, before importing jax)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if flags.strip():
        env["XLA_FLAGS"] = flags.strip()
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _failed_cell(nb) -> tuple[int, str]:
    """The index and source of the first code cell with an error output, else (a timeout, a
    dead kernel) of the last cell that started running."""
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, cell in code:
        if any(o.output_type == "error" for o in cell.get("outputs", [])):
            return i, cell.source
    started = [(i, c) for i, c in code if c.get("execution_count") is not None]
    return (started[-1][0], started[-1][1].source) if started else (-1, "")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # the kernel's cwd
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        i, source = _failed_cell(nb)
        where = f"cell {i}" if i >= 0 else "kernel start"
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback without terminal colours
        pytest.fail(f"{path.name}: {where} failed:\n{source}\n\n{error}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")


def test_notebooks_are_stored_stripped_and_valid():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"
    problems = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        try:
            nbformat.validate(nb)
        except nbformat.ValidationError as e:
            problems.append(f"{path.name}: invalid nbformat: {e.message}")
        kernel = nb.metadata.get("kernelspec", {}).get("name")
        if kernel != "python3":
            problems.append(f"{path.name}: kernelspec {kernel!r}, not 'python3'")
        if not any(c.cell_type == "markdown" and c.source.startswith("# ") for c in nb.cells[:1]):
            problems.append(f"{path.name}: does not open with a markdown title")
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if cell.get("outputs"):
                problems.append(f"{path.name}: cell {i} has stored outputs (run nbstripout)")
            if cell.get("execution_count") is not None:
                problems.append(f"{path.name}: cell {i} has an execution_count (run nbstripout)")
    assert not problems, "\n".join(problems)


def test_readme_lists_every_notebook():
    """``notebooks/README.md`` links each notebook, and each link is a notebook that exists."""
    text = (NOTEBOOKS_DIR / "README.md").read_text()
    linked = set(re.findall(r"\]\(([^)]+\.ipynb)\)", text))
    assert linked, "notebooks/README.md links no notebook"
    missing = sorted(n for n in linked if not (NOTEBOOKS_DIR / n).is_file())
    assert not missing, f"notebooks/README.md links notebooks that do not exist: {missing}"
    unlisted = sorted({p.name for p in NOTEBOOKS} - linked)
    assert not unlisted, f"notebooks/README.md does not link: {unlisted}"
