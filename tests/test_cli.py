"""The `peftjax` command line: inspect, merge (streaming, sharded), and the demo.

``merge`` is checked against PEFT's own merged weights (the Llama fixtures) and, for the case
table's rows (``tests/cases.py``), against the library's `merge_and_unload` of the same adapter.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peftjax as pj
from peftjax import cli, io as pio
from peftjax.methods import PEFT_TYPES
from tests.cases import file_rows, injected, spread
from tests.conftest import leaf_names, randomize

FIX = Path(__file__).parent / "fixtures" / "peft"
#: the Llama fixtures (made by real PEFT) of every registered method: ``merge`` against PEFT's
#: own merged weights
METHODS = sorted(
    d.name
    for d in FIX.glob("llama_*")
    if json.loads((d / "adapter_config.json").read_text())["peft_type"] in PEFT_TYPES
)


def _checkpoint(tmp_path, case, shards: int, dtype=np.float32) -> Path:
    """An HF-style checkpoint dir of the fixture's torch base weights, split into shards."""
    base = load_file(FIX / case / "base.safetensors")
    d = tmp_path / "base"
    d.mkdir()
    keys = sorted(base)
    if shards == 1:
        save_file(
            {k: base[k].astype(dtype) for k in keys}, d / "model.safetensors", {"format": "pt"}
        )
    else:
        weight_map = {}
        for i, chunk in enumerate(np.array_split(np.array(keys), shards)):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: base[k].astype(dtype) for k in chunk}, d / name, {"format": "pt"})
            weight_map.update({k: name for k in chunk})
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    shutil.copy(FIX / case / "llama_config.json", d / "config.json")
    return d


@pytest.mark.parametrize(
    "case,shards",
    # shards: the same for every method; LoRA, DoRA and LoKr by default, the others -m slow
    [
        (c, 1)
        if c in ("llama_lora", "llama_dora", "llama_lokr")
        else pytest.param(c, 1, marks=pytest.mark.slow)
        for c in METHODS
    ]
    + [("llama_lora", 3)],
)
def test_merge_matches_peft_merge_and_unload(tmp_path, case, shards, capsys):
    base = _checkpoint(tmp_path, case, shards)
    out = tmp_path / "out"
    rc = cli.main(["merge", "--base", str(base), "--adapter", str(FIX / case), "--out", str(out)])
    assert rc == 0
    expected = {
        k[len("merged.") :]: v
        for k, v in load_file(FIX / case / "io.safetensors").items()
        if k.startswith("merged.")
    }
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(load_file(FIX / case / "base.safetensors"))
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    # same shard files, same index, config copied
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    if shards > 1:
        assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads(
            (base / "model.safetensors.index.json").read_text()
        )


# ---------------------------------------------------------------------------------- the case table


def _layout_of(layouts, module: str):
    if isinstance(layouts, pj.Layout):
        return layouts
    for pat, lay in (layouts or {}).items():
        if module == pat or module.endswith("." + pat):
            return lay
    return None


def torch_state_dict(tree, layouts=None) -> dict[str, np.ndarray]:
    """A plain params tree of a case's family as an HF torch checkpoint: ``kernel`` -> ``weight``
    (Linear ``(out, in)``, a DenseGeneral kernel's axes flattened as its layout says; conv
    ``(out, in, kh, kw)``), ``embedding`` and LayerNorm ``scale`` -> ``weight``, biases
    flattened; a stacked leaf (``layouts`` with ``stack``, under ``layers``) gives one key per
    layer, the index after the ``layers`` segment (PEFT's names, `pj.io.stacked_key_map`)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        *mod, leaf = leaf_names(path)
        lay = _layout_of(layouts, ".".join(mod))
        stacked = bool(lay is not None and lay.stack) and "layers" in mod
        x = np.asarray(x)
        for i, w in enumerate(x) if stacked else [(None, x)]:
            name = list(mod)
            if i is not None:
                name.insert(name.index("layers") + 1, str(i))
            if leaf == "kernel" and lay is None and w.ndim > 2:  # conv
                w = w.transpose(w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))
            elif leaf == "kernel":
                n_in = 1 if lay is None else lay.n_in
                w = w.reshape(int(np.prod(w.shape[:n_in])), -1).T
            elif leaf == "bias":
                w = w.reshape(-1)
            key = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
            out[".".join([*name, key])] = np.ascontiguousarray(w)
    return out


#: rows whose merge failed once, kept on purpose: LN-tuning copies of stacked layers (one PEFT
#: module per layer in the file, not one stacked key)
KNOWN_FAILURES: dict[str, str] = {}
REGRESSIONS = ("ln_tuning-stacked",)


def _cli_rows():
    """`spread` of the file rows (every method, tree family and weight kind: what ``merge`` reads
    differs between Linear, DenseGeneral, conv, embedding, stacked per-layer keys, copies and an
    IA3 bias), and the rows of `KNOWN_FAILURES`."""
    rows = file_rows()
    picked = {c.name for c in spread(rows)} | set(KNOWN_FAILURES) | set(REGRESSIONS)
    return [
        pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[c.name], strict=True))
        if c.name in KNOWN_FAILURES
        else c
        for c in rows
        if c.name in picked
    ]


@pytest.mark.parametrize("case", _cli_rows(), ids=str)
def test_merge_matches_the_library_merge(tmp_path, case, capsys):
    """``peftjax merge`` of a saved table adapter into its base as a torch checkpoint gives the
    library's `merge_and_unload`, tensor for tensor."""
    base, q = injected(case)
    q = randomize(q, seed=6)
    pio.save_pretrained(q, tmp_path / "adapter")
    ckpt = tmp_path / "base"
    ckpt.mkdir()
    torch_base = torch_state_dict(base, case.layouts)
    save_file(torch_base, ckpt / "model.safetensors", {"format": "pt"})
    out = tmp_path / "out"
    argv = ["merge", "--base", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    got = load_file(out / "model.safetensors")
    want = torch_state_dict(pj.merge_and_unload(q), case.layouts)
    assert sorted(got) == sorted(want)
    changed = 0
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        changed += not np.array_equal(v, torch_base[k])
    assert changed, "the adapter changed nothing"


def test_merge_keeps_bf16_dtype(tmp_path):
    import ml_dtypes

    base = _checkpoint(tmp_path, "llama_lora", 2, dtype=ml_dtypes.bfloat16)
    out = tmp_path / "out"
    assert (
        cli.main(
            ["merge", "--base", str(base), "--adapter", str(FIX / "llama_lora"), "--out", str(out)]
        )
        == 0
    )
    from peftjax.io import read_safetensors

    for f in sorted(out.glob("*.safetensors")):
        t, _ = read_safetensors(f)
        assert all(v.dtype == ml_dtypes.bfloat16 for v in t.values())
    t, _ = read_safetensors(next(out.glob("model-00001*")))
    expected = load_file(FIX / "llama_lora" / "io.safetensors")
    for k, v in t.items():
        if "q_proj" in k:
            np.testing.assert_allclose(v.astype(np.float32), expected["merged." + k], atol=2e-2)


def test_merge_refuses_pickle_and_writes_nothing_on_error(tmp_path, capsys):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    out = tmp_path / "out"
    rc = cli.main(
        ["merge", "--base", str(base), "--adapter", str(FIX / "llama_lora"), "--out", str(out)]
    )
    assert rc == 2
    assert "pickle" in capsys.readouterr().err
    assert not out.exists()
    # an adapter whose modules the checkpoint lacks: an error listing them, no output dir
    base2 = _checkpoint(tmp_path, "llama_lora", 1)
    t = load_file(base2 / "model.safetensors")
    del t["model.layers.1.self_attn.q_proj.weight"]
    save_file(t, base2 / "model.safetensors")
    rc = cli.main(
        ["merge", "--base", str(base2), "--adapter", str(FIX / "llama_lora"), "--out", str(out)]
    )
    assert rc == 2
    assert "model.layers.1.self_attn.q_proj" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_merge_safe_refuses_non_finite(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(FIX / "llama_lora", adapter)
    t = load_file(adapter / "adapter_model.safetensors")
    k = next(k for k in t if k.endswith("lora_B.weight"))
    t[k] = np.full_like(t[k], np.inf)
    save_file(t, adapter / "adapter_model.safetensors", {"format": "pt"})
    base = _checkpoint(tmp_path, "llama_lora", 1)
    out = tmp_path / "out"
    rc = cli.main(
        ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--safe"]
    )
    assert rc == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()


def test_inspect(capsys):
    assert cli.main(["inspect", str(FIX / "llama_lokr")]) == 0
    text = capsys.readouterr().out
    assert "lokr" in text and "model.layers.1.self_attn.v_proj" in text
    size = os.path.getsize(FIX / "llama_lokr" / "adapter_model.safetensors")
    assert f"{size:,d} bytes" in text


@pytest.mark.slow
def test_demo_trains_merges_and_saves(tmp_path):
    from peftjax.demo import run

    res = run(
        method="lora",
        rank=4,
        steps=30,
        batch=8,
        seq=32,
        out=str(tmp_path / "a"),
        print_fn=lambda *a: None,
        progress=False,
    )
    assert res["loss_after"] < res["loss_before"] - 0.3
    assert res["merge_diff"] < 1e-3 and res["moved"] > 0.1 and res["reload_diff"] < 1e-4
    for name in ("A", "B"):  # PEFT's layout for named adapters: <out>/<name>/
        assert (tmp_path / "a" / name / "adapter_model.safetensors").exists()
        cfg = json.loads((tmp_path / "a" / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


@pytest.mark.slow
def test_demo_cli_exits_0_and_reports_progress(tmp_path, capsys):
    """`peftjax demo` end to end: exit 0, the loss table and samples on stdout, the training
    bars on stderr (one finished line per adapter off a terminal); ``--no-progress``: none."""
    argv = ["demo", "--steps", "20", "--out", str(tmp_path / "a")]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    assert "held-out loss" in cap.out and "[A (verse)]" in cap.out and "[B (sums)]" in cap.out
    assert "A (verse)" in cap.err and "B (sums)" in cap.err and "step   20/20" in cap.err
    assert cli.main(["demo", "--steps", "2", "--no-save", "--no-progress"]) in (0, 1)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_demo_trains_prompt_methods(tmp_path, method):
    """`peftjax demo --method prompt_tuning` / `prefix_tuning`: the loss falls, nothing merges,
    and PEFT's files are written."""
    from peftjax.demo import demo_ok, run

    lines = []
    res = run(
        method=method,
        steps=30,
        batch=8,
        seq=32,
        out=str(tmp_path / "a"),
        print_fn=lines.append,
        progress=False,
    )
    assert res["loss_after"] < res["loss_before"] - 0.3 and res["moved"] > 0.1
    assert res["merged"] is None and any("does not merge" in l for l in lines)
    assert demo_ok(res)
    for name in ("A", "B"):
        cfg = json.loads((tmp_path / "a" / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == method.upper()
        tensors = load_file(tmp_path / "a" / name / "adapter_model.safetensors")
        assert set(tensors) == {"prompt_embeddings"}


def test_merge_lora_embedding_checkpoint(tmp_path):
    """An embedding LoRA (no transpose) merges like PEFT's merge_and_unload."""
    case = "lora_embedding"
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        load_file(FIX / case / "base.safetensors"), base / "model.safetensors", {"format": "pt"}
    )
    out = tmp_path / "out"
    rc = cli.main(["merge", "--base", str(base), "--adapter", str(FIX / case), "--out", str(out)])
    assert rc == 0
    got = load_file(out / "model.safetensors")
    io = load_file(FIX / case / "io.safetensors")
    for k, v in io.items():
        if k.startswith("merged."):
            np.testing.assert_allclose(got[k[len("merged.") :]], v, rtol=1e-5, atol=1e-5)
    assert not np.allclose(
        got["emb.weight"], load_file(FIX / case / "base.safetensors")["emb.weight"]
    )


def test_merge_truncated_shard_header_is_a_clear_error(tmp_path, capsys):
    base = _checkpoint(tmp_path, "llama_lora", 1)
    (base / "model.safetensors").write_bytes(b"\x10\x00")  # not even the 8-byte length
    out = tmp_path / "out"
    rc = cli.main(
        ["merge", "--base", str(base), "--adapter", str(FIX / "llama_lora"), "--out", str(out)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated" in err
    assert not out.exists()


def test_demo_progress_writes_to_the_current_stderr(monkeypatch):
    """The bar looks `sys.stderr` up when it is made (a stream bound at import may be closed
    by then: pytest's capture, a notebook's), and reports the step and loss there."""
    import io
    import sys

    from peftjax.demo import progress_bar

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    with progress_bar() as bar:
        task = bar.add_task("A (verse)", total=4, loss=float("nan"), tps=0.0)
        bar.update(task, completed=4, loss=1.0, tps=128.0)
    assert "step    4/4" in buf.getvalue() and "loss  1.000" in buf.getvalue()


def test_merge_progress_reports_shards_and_quiet_stays_quiet(tmp_path, capsys):
    """``peftjax merge`` reports its shards on stderr (rich; off a terminal one finished line);
    ``merge_checkpoint(progress=False)`` writes nothing there."""
    from peftjax.cli_files import merge_checkpoint

    base = _checkpoint(tmp_path, "llama_lora", 3)
    argv = ["merge", "--base", str(base), "--adapter", str(FIX / "llama_lora")]
    assert cli.main([*argv, "--out", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "shard 3/3" in err and "\r" not in err
    merge_checkpoint(base, FIX / "llama_lora", tmp_path / "o2", progress=False)
    assert capsys.readouterr().err == ""
