"""The README quickstart runs as written, and every docstring example (`>>>`) passes."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import peftjax

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quickstart_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    quickstart = blocks[0]
    assert len(quickstart.strip().splitlines()) <= 17
    exec(compile(quickstart, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trainable params: ")
    assert float(out[-1]) < 1e-4  # merged model == adapted forward


def test_readme_setup_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && peftjax demo" in readme
    assert 'pip install -e ".[test]" && python -m pytest' in readme
    assert 'pip install -e ".[test]"' in ci and "python -m pytest" in ci


MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(peftjax.__path__, "peftjax.")
    if m.name != "peftjax.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_names_are_exported():
    for name in peftjax.__all__:
        assert hasattr(peftjax, name), name
    for name in [
        "inject",
        "set_active",
        "delete",
        "merge",
        "unmerge",
        "merge_and_unload",
        "unload",
        "adapter_names",
        "active",
        "targeted_modules",
        "partition",
        "combine",
        "apply",
        "save_pretrained",
        "load_pretrained",
        "LoraConfig",
        "LoHaConfig",
        "LoKrConfig",
        "IA3Config",
        "LNTuningConfig",
    ]:
        assert name in peftjax.__all__, name
