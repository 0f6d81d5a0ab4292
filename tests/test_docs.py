"""The README quickstart runs as written, and every docstring example (`>>>`) passes."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import peftjax

ROOT = Path(__file__).resolve().parent.parent


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_runs_as_written(capsys):
    blocks = _blocks("python")
    assert blocks, "README has no python block"
    quickstart = blocks[0]
    assert len(quickstart.strip().splitlines()) <= 17
    exec(compile(quickstart, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trainable params: ")
    assert float(out[-1]) < 1e-4  # merged model == adapted forward


def _hf_checkpoint(base, out: Path) -> None:
    """An HF-style safetensors checkpoint (torch layouts) of the quickstart's plain params."""
    from peftjax.io import write_safetensors

    tensors = {}
    for mod, leaves in base["params"].items():
        tensors[f"{mod}.weight"] = np.asarray(leaves["kernel"]).T
        tensors[f"{mod}.bias"] = np.asarray(leaves["bias"])
    out.mkdir()
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text("{}")


def test_every_readme_block_runs_in_order(tmp_path, monkeypatch, capsys):
    """All python blocks run in one namespace, in a fresh cwd (relative paths as written); then
    every ``peftjax ...`` line of the bash blocks (past the two set-up commands) runs through
    the CLI against what the python blocks made."""
    from peftjax import io
    from peftjax.cli import main

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(_blocks("python")):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    capsys.readouterr()
    _hf_checkpoint(ns["base"], tmp_path / "hf-model")
    lines = [
        line.split("#")[0].split()
        for block in _blocks("bash")
        for line in block.splitlines()
        if line.startswith("peftjax ")
    ]
    assert [l[1] for l in lines] == ["inspect", "merge"], lines
    for argv in lines:
        assert main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "method:" in out and "lora" in out
    # the merged checkpoint is the merged model, in torch layout
    merged, _ = io.read_safetensors(tmp_path / "merged" / "model.safetensors")
    want = pj_merge(ns)
    for mod, leaves in want["params"].items():
        np.testing.assert_allclose(
            merged[f"{mod}.weight"], np.asarray(leaves["kernel"]).T, atol=1e-6
        )
        # LoRA leaves biases alone (and `bias` is written before `weight`)
        np.testing.assert_array_equal(merged[f"{mod}.bias"], np.asarray(leaves["bias"]))
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"


def pj_merge(ns):
    return ns["pj"].merge_and_unload(ns["loaded"])


def test_readme_has_no_placeholder():
    text = (ROOT / "README.md").read_text()
    assert "TESTTIME" not in text and "TODO" not in text


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
