"""`peftjax demo`'s shipped base, text and run.

The fast checks read the shipped files (``peftjax/data/``): the base loads with its recorded
config, is pretrained (held-out loss far below a random init's, and the loss the pretraining
script recorded), its metadata's hashes match the files, and the text is what the script makes
for the recorded seed. The full demo run (two adapters, merge, save, load) is slow.
"""

import hashlib
import importlib.util
import io
import json
import re
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax import demo

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pretrain_base.py"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_base", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shipped():
    return demo.load_base()


@pytest.fixture(scope="module")
def loss_of(shipped):
    """``loss_of(params, x, y)``: the model's mean cross-entropy, one compile for every tree."""
    model = shipped[0]
    f = jax.jit(
        lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    )
    return lambda p, x, y: float(f(p, x, y))


def test_shipped_base_loads_with_the_recorded_config(shipped):
    model, params, tok, meta = shipped
    cfg = meta["model"]
    assert (model.vocab, model.hidden, model.layers, model.heads, model.inter) == (
        cfg["vocab"],
        cfg["hidden"],
        cfg["layers"],
        cfg["heads"],
        cfg["inter"],
    )
    assert len(tok.chars) == cfg["vocab"] == len(set(meta["vocab"]))
    # the tree is exactly what the model's init makes (same paths, shapes, dtypes)
    fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    shape = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
    assert shape(params) == shape(fresh)
    # every character of the shipped text is in the vocabulary (nothing dropped by encode)
    for style in ("corpus", "verse", "sums"):
        for split in ("train", "heldout"):
            text = demo.load_text(style, split)
            assert tok.decode(tok.encode(text)) == text, (style, split)
    # package data: found through importlib.resources, as an installed peftjax finds it
    assert resources.files("peftjax").joinpath("data/demo_base.safetensors").is_file()


def test_base_is_pretrained(shipped, loss_of):
    """Its held-out loss is far below a random init's, and is the one the script recorded."""
    model, params, tok, meta = shipped
    held = tok.encode(demo.load_text("corpus", "heldout"))
    x, y = next(demo.batches(held, 64, meta["seq"], meta["seed"] + 1))  # the script's batch
    loss = loss_of(params, x, y)
    random_init = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    loss_random = loss_of(random_init, x, y)
    assert loss_random > 3.5  # about ln(vocab)
    assert loss < 1.2 and loss < loss_random - 2.5
    np.testing.assert_allclose(loss, meta["heldout_loss"], rtol=1e-3)


def test_recorded_metadata_matches_the_shipped_files(shipped):
    *_, meta = shipped
    data = ROOT / "peftjax" / "data"
    assert set(meta["sha256"]) >= {"demo_base.safetensors", "corpus_train.txt", "sums_heldout.txt"}
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
    # the command is recorded in the JSON and in the script's docstring, with the seed and steps
    cmd = meta["command"]
    assert cmd.startswith("python scripts/pretrain_base.py ")
    assert f"--seed {meta['seed']}" in cmd and f"--steps {meta['steps']}" in cmd
    script = _script()
    assert cmd in script.__doc__
    # and the text is what the script makes for that seed
    assert script.make_text(meta["seed"]) == {
        n: (data / n).read_text("utf-8") for n in script.make_text(meta["seed"])
    }
    assert script.make_text(meta["seed"] + 1) != script.make_text(meta["seed"])


def test_shipped_data_is_package_data():
    """Every shipped file matches a ``[tool.setuptools.package-data]`` glob (so that
    ``pip install .`` carries it), and the data stays small."""
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["peftjax"]
    data = ROOT / "peftjax" / "data"
    files = [p for p in data.iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".txt", ".json", ".safetensors"}
    for p in files:
        assert any(Path(f"data/{p.name}").match(g) for g in globs), p.name
    assert sum(p.stat().st_size for p in files if p.suffix == ".txt") < 400_000
    assert (data / "demo_base.safetensors").stat().st_size < 6_000_000


def test_styles_are_distinct_and_split():
    verse, sums = demo.load_text("verse", "train"), demo.load_text("sums", "train")
    assert all(re.fullmatch(r"\d+\+\d+=\d+", l) for l in sums.splitlines())
    a, b, c = map(int, re.split(r"[+=]", sums.splitlines()[0]))
    assert a + b == c
    assert all(s.startswith("O ") for s in verse.split("\n\n"))
    for style in ("corpus", "verse", "sums"):  # held-out text is not a slice of the train text
        train, held = demo.load_text(style, "train"), demo.load_text(style, "heldout")
        assert held not in train and len(held) > 2000


def test_progress_bar_reports_steps_off_a_terminal():
    """Off a terminal (pytest's capture, CI logs) rich prints the finished bar once, readable."""
    from rich.console import Console

    buf = io.StringIO()
    bar = demo.progress_bar(Console(file=buf))
    with bar:
        t = bar.add_task("A (verse)", total=4, loss=float("nan"), tps=0.0)
        bar.update(t, completed=4, loss=1.25, tps=1000.0)
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out  # no cursor moves or colours
    assert "A (verse)" in out and "step    4/4" in out and "loss  1.250" in out


@pytest.mark.slow
def test_demo_adapts_the_base_to_both_styles(tmp_path, capsys):
    out = tmp_path / "adapters"
    lines = []
    res = demo.run(steps=80, out=str(out), print_fn=lines.append, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: quiet
    table = res["losses"]
    # each adapter beats the base on its own style by a margin, and is the best there
    assert table["A"]["verse"] < table["base"]["verse"] - 0.3
    assert table["B"]["sums"] < table["base"]["sums"] - 1.0
    assert table["A"]["verse"] < table["B"]["verse"] and table["B"]["sums"] < table["A"]["sums"]
    assert demo.demo_ok(res)
    s = res["samples"]
    assert len({s["base"], s["A"], s["B"]}) == 3
    assert s["B"].count("=") > s["A"].count("=")  # the sums adapter writes sums
    assert res["merge_diff"] < 1e-3 and res["moved"] > 0.1
    assert any("held-out loss" in l for l in lines) and any("[B (sums)]" in l for l in lines)
    # both adapters in PEFT's layout for named adapters, and they load back and reproduce
    model, base, tok, _ = demo.load_base()
    x, _ = demo.eval_windows(tok.encode(demo.load_text("sums", "heldout")), 4, 64)
    fwd = jax.jit(pj.apply(model.apply))
    for name in ("A", "B"):
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
        loaded = pj.load_pretrained(base, out, name=name)
        want = fwd(pj.set_active(res["params"], name), x)
        np.testing.assert_allclose(fwd(loaded, x), want, atol=1e-5)
        file_cfg, tensors = pj.read_adapter(out, name)
        assert file_cfg.r == 8 and any(k.endswith("lora_B.weight") for k in tensors)
    # the merged tree is a plain base-shaped tree giving A's outputs
    np.testing.assert_allclose(
        jax.jit(model.apply)(res["merged"], x),
        fwd(pj.set_active(res["params"], "A"), x),
        atol=1e-3,
    )
