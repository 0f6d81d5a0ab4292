"""`peftjax merge` / `inspect` hardening: hostile shard names, links and special files, bad
`--out`, interrupted merges (kill tests), `--safe` messages, embedding base-layer weights and
the help texts. Every refusal: exit 2, one `peftjax <cmd>: error:` line naming the file, inputs
byte-identical, nothing left next to `--out`."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from peftjax import cli, cli_files

FIX = Path(__file__).parent / "fixtures" / "peft"
LORA = FIX / "llama_lora"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _checkpoint(d: Path, shards: int = 2) -> Path:
    """An HF-style checkpoint of the llama_lora fixture's base weights in ``d``."""
    base = load_file(LORA / "base.safetensors")
    d.mkdir(parents=True)
    keys = sorted(base)
    if shards == 1:
        save_file(base, d / "model.safetensors", {"format": "pt"})
    else:
        wm = {}
        for i, chunk in enumerate(np.array_split(np.array(keys), shards)):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: base[k] for k in chunk}, d / name, {"format": "pt"})
            wm.update({str(k): name for k in chunk})
        (d / cli_files.INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": wm})
        )
    (d / "config.json").write_text((LORA / "llama_config.json").read_text())
    return d


def _hashes(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(d))] = "-> " + os.readlink(p)
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _merge(base, out, adapter=LORA, *extra) -> int:
    return cli.main(
        ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra]
    )


def _leftovers(parent: Path, out_name: str = "out") -> list[str]:
    """peftjax's partial dirs and lock file for ``--out parent/out_name``."""
    pat = cli_files._partial_re(parent / out_name)
    return sorted(
        p.name for p in parent.iterdir() if pat.fullmatch(p.name) or p.name == f".{out_name}.lock"
    )


def _one_error_line(err: str, cmd: str = "merge") -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("\r[")]
    lines = [l for l in lines if "] shard " not in l]
    assert len(lines) == 1 and lines[0].startswith(f"peftjax {cmd}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging) if the block blocks, e.g. on a FIFO."""

    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ 1: traversal


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_outside_base_is_refused_and_outside_file_untouched(tmp_path, how, capsys):
    base = _checkpoint(tmp_path / "base")
    outside = tmp_path / "outside.safetensors"  # what `base/../outside.safetensors` names
    save_file(load_file(base / SHARD2), outside, {"format": "pt"})
    index = json.loads((base / cli_files.INDEX_NAME).read_text())
    if how == "symlink":
        (base / SHARD2).unlink()
        (base / SHARD2).symlink_to(outside)
    else:
        name = "../outside.safetensors" if how == "dotdot" else str(outside)
        index["weight_map"] = {
            k: (name if v == SHARD2 else v) for k, v in index["weight_map"].items()
        }
        (base / cli_files.INDEX_NAME).write_text(json.dumps(index))
    before, outside_sha = _hashes(base), _sha(outside)
    out = tmp_path / "out"
    assert _merge(base, out) == 2
    line = _one_error_line(capsys.readouterr().err)
    if how == "symlink":
        assert "symlink" in line and SHARD2 in line
    else:
        assert "weight_map" in line and "not a plain file name" in line
    assert _sha(outside) == outside_sha
    assert _hashes(base) == before
    assert not out.exists() and not os.path.lexists(out)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "index, needle",
    [
        ({"weight_map": ["model.safetensors"]}, "weight_map"),
        ({"weight_map": {}}, "weight_map"),
        ({"metadata": {}}, "weight_map"),
        ([1, 2], "JSON object"),
        ({"weight_map": {"lm_head.weight": 7}}, "lm_head.weight"),
        ({"weight_map": {"lm_head.weight": None}}, "lm_head.weight"),
        ({"weight_map": {"lm_head.weight": "sub/model-00001.safetensors"}}, "subfolder"),
        ({"weight_map": {"lm_head.weight": ""}}, "lm_head.weight"),
        ({"weight_map": {"lm_head.weight": "missing.safetensors"}}, "does not exist"),
    ],
)
def test_malformed_index_is_a_clear_error(tmp_path, index, needle, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "sub").mkdir()
    save_file(
        {"lm_head.weight": np.zeros((2, 2), np.float32)}, base / "sub" / "model-00001.safetensors"
    )
    (base / cli_files.INDEX_NAME).write_text(json.dumps(index))
    before = _hashes(base)
    assert _merge(base, tmp_path / "out", tmp_path / "no-adapter") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert needle in line and cli_files.INDEX_NAME in line
    assert _hashes(base) == before and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ 2: links, special files


@pytest.mark.parametrize(
    "which, kind",
    [
        ("model.safetensors", "FIFO"),
        (cli_files.INDEX_NAME, "FIFO"),
        ("tokenizer.json", "FIFO"),
        ("model.safetensors", "device"),
    ],
)
def test_fifo_or_device_is_refused_without_blocking(tmp_path, which, kind, capsys):
    base = _checkpoint(tmp_path / "base", shards=1)
    if which == "model.safetensors":
        (base / which).unlink()
    if kind == "FIFO":
        os.mkfifo(base / which)
    else:
        try:  # /dev/zero's numbers: read without a size check, it never ends
            os.mknod(base / which, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        except (PermissionError, AttributeError):
            pytest.skip("cannot make a device node here")
    with _deadline(60):
        assert _merge(base, tmp_path / "out") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert kind in line and which in line
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_side_file_linked_outside_aborts_before_writing(tmp_path, capsys):
    base = _checkpoint(tmp_path / "base")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the merged model")
    (base / "tokenizer.json").symlink_to(secret)
    (base / "also.txt").symlink_to("/etc/hostname")
    before = _hashes(base)
    assert _merge(base, tmp_path / "out") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "also.txt" in line and "symlink" in line  # the first one, in name order
    assert _hashes(base) == before
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_hub_cache_snapshot_links_are_followed_and_copied_as_files(tmp_path):
    """An HF hub cache snapshot: every file a link into the repo's blobs/, which is allowed;
    a link inside --base is followed too. --out gets regular files."""
    plain = _checkpoint(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in plain.iterdir():
        blob = repo / "blobs" / _sha(p)
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (snap / "extra").mkdir()
    (snap / "extra" / "chat_template.jinja").write_text("{{ x }}")
    (snap / "chat_template.jinja").symlink_to("extra/chat_template.jinja")
    out = tmp_path / "out"
    assert _merge(snap, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*(p.name for p in plain.iterdir()), "chat_template.jinja"])
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert (out / "chat_template.jinja").read_text() == "{{ x }}"
    assert (out / "config.json").read_bytes() == (plain / "config.json").read_bytes()
    ref = tmp_path / "ref"
    assert _merge(plain, ref) == 0
    assert _hashes(out) == {
        **_hashes(ref),
        "chat_template.jinja": _sha(out / "chat_template.jinja"),
    }


# ---------------------------------------------------------------------------------- 3: --out


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("file", "not a directory"),
        ("symlink", "symlink"),
        ("dangling", "dangling symlink"),
        ("base", "inside it"),
        ("inside", "inside it"),
        ("nonempty", "not empty"),
    ],
)
def test_bad_out_is_refused_before_any_work(tmp_path, kind, needle, capsys):
    base = _checkpoint(tmp_path / "base", shards=1)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    elif kind == "symlink":
        (tmp_path / "empty").mkdir()
        out.symlink_to(tmp_path / "empty")
    elif kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "base":
        out = base
    elif kind == "inside":
        out = base / "merged"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before, listing = _hashes(base), sorted(os.listdir(tmp_path))
    # a missing adapter: --out is judged first, so the error is about --out
    assert _merge(base, out, tmp_path / "no-adapter") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and needle in line
    assert _hashes(base) == before and sorted(os.listdir(tmp_path)) == listing
    assert not (tmp_path / "nowhere").exists()


def test_os_errors_are_one_line(tmp_path, monkeypatch, capsys):
    base = _checkpoint(tmp_path / "base", shards=1)
    (tmp_path / "afile").write_text("x")
    assert _merge(base, tmp_path / "afile" / "out") == 2  # the parent is a file
    assert "afile" in _one_error_line(capsys.readouterr().err)

    def full(src, st, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(cli_files, "_copy_file", full)
    assert _merge(base, tmp_path / "out") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert os.strerror(errno.ENOSPC) in line and "config.json" in line
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------- 4: partial dirs, lock, kills


def test_stale_partials_removed_under_the_lock(tmp_path, capsys):
    import fcntl

    base = _checkpoint(tmp_path / "base")
    stale = tmp_path / ".out.partial-ab12_x9z"
    stale.mkdir()
    (stale / SHARD1).write_bytes(b"half a shard")
    keep = [tmp_path / ".out.partial-keepme", tmp_path / ".other.partial-ab12_x9z"]
    for k in keep:
        k.mkdir()
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as f:  # another merge to the same --out is running
        fcntl.flock(f, fcntl.LOCK_EX)
        assert _merge(base, out) == 2
        assert "locked" in _one_error_line(capsys.readouterr().err)
        assert stale.exists() and not out.exists()
    assert _merge(base, out) == 0
    assert "removed 1 partial" in capsys.readouterr().out
    assert not stale.exists() and all(k.exists() for k in keep)
    assert _leftovers(tmp_path) == []


_KILL = textwrap.dedent(
    """
    import os, signal, sys
    n, when, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    real, count = os.replace, [0]
    def replace(a, b, **kw):
        mine = str(b).startswith(root)
        count[0] += mine
        if mine and count[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b, **kw)
        if mine and count[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from peftjax import cli
    sys.exit(cli.main(sys.argv[4:]))
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted merge of a 2-shard checkpoint: its files' hashes."""
    d = tmp_path_factory.mktemp("ref")
    base = _checkpoint(d / "base")
    assert _merge(base, d / "out") == 0
    return _hashes(d / "out")


# 2 shards: renames 1 and 2 are the shards' temp files, 3 is the partial dir -> --out
@pytest.mark.slow
@pytest.mark.parametrize("n, when", [(1, "before"), (2, "before"), (3, "before"), (3, "after")])
def test_killed_merge_leaves_out_absent_or_complete(tmp_path, reference, n, when):
    base = _checkpoint(tmp_path / "base")
    before = _hashes(base)
    out = tmp_path / "out"
    args = ["merge", "--base", str(base), "--adapter", str(LORA), "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, str(n), when, str(tmp_path), *args],
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _hashes(base) == before
    if when == "after":
        assert _hashes(out) == reference
        assert not [p for p in _leftovers(tmp_path) if ".partial-" in p]
        return
    assert not os.path.lexists(out)
    assert [p for p in _leftovers(tmp_path) if ".partial-" in p]  # what the kill left
    assert _merge(base, out) == 0
    assert _hashes(out) == reference
    assert _leftovers(tmp_path) == [] and _hashes(base) == before


# ------------------------------------------------------------------------------ 5: --safe


def test_safe_error_names_the_checkpoint_module_and_key(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((LORA / "adapter_config.json").read_text())
    t = load_file(LORA / "adapter_model.safetensors")
    k = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    t[k] = np.full_like(t[k], np.inf)
    save_file(t, adapter / "adapter_model.safetensors", {"format": "pt"})
    base = _checkpoint(tmp_path / "base", shards=1)
    assert _merge(base, tmp_path / "out", adapter, "--safe") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "non-finite" in line
    assert "`model.layers.1.self_attn.o_proj`" in line
    assert "model.layers.1.self_attn.o_proj.weight" in line and "model.safetensors" in line
    assert "`m`" not in line
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------- 6: embedding base weights

V0, V1, D, R, ALPHA = 10, 12, 8, 2, 4


def _resized_case(tmp_path):
    """A checkpoint with vocab V0 and a PEFT LoRA adapter on embed_tokens and lm_head saved
    after a resize to V1 (PEFT then stores each module's full ``base_layer.weight``)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    base = tmp_path / "base"
    base.mkdir()
    shard1 = {"model.embed_tokens.weight": f32(V0, D), "model.norm.weight": f32(D)}
    shard2 = {
        "lm_head.weight": f32(V0, D),
        "model.layers.0.mlp.down_proj.weight": f32(D, D).astype(ml_dtypes.bfloat16),
    }
    save_file(shard1, base / SHARD1, {"format": "pt"})
    save_file(shard2, base / SHARD2, {"format": "pt"})
    total = sum(v.nbytes for v in [*shard1.values(), *shard2.values()])
    wm = {**{k: SHARD1 for k in shard1}, **{k: SHARD2 for k in shard2}}
    index = {"metadata": {"total_size": total}, "weight_map": wm}
    (base / cli_files.INDEX_NAME).write_text(json.dumps(index))
    (base / "config.json").write_text(json.dumps({"vocab_size": V0, "hidden_size": D}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = json.loads((LORA / "adapter_config.json").read_text())
    cfg.update(r=R, lora_alpha=ALPHA, target_modules=["embed_tokens", "lm_head"])
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    p = "base_model.model."
    t = {
        f"{p}model.embed_tokens.base_layer.weight": f32(V1, D),
        f"{p}model.embed_tokens.lora_embedding_A": f32(R, V1),
        f"{p}model.embed_tokens.lora_embedding_B": f32(D, R),
        f"{p}lm_head.base_layer.weight": f32(V1, D),
        f"{p}lm_head.lora_A.weight": f32(R, D),
        f"{p}lm_head.lora_B.weight": f32(V1, R),
    }
    save_file(t, adapter / "adapter_model.safetensors", {"format": "pt"})
    return base, adapter, shard1, shard2, t


def test_merge_uses_the_adapters_embedding_base_layer_weights(tmp_path):
    base, adapter, shard1, shard2, t = _resized_case(tmp_path)
    before = _hashes(base)
    out = tmp_path / "out"
    assert _merge(base, out, adapter) == 0
    p, s = "base_model.model.", ALPHA / R
    # numpy references (PEFT's layouts): Embedding W + (B @ A).T * s, Linear W + B @ A * s
    emb = (
        t[f"{p}model.embed_tokens.base_layer.weight"]
        + (
            t[f"{p}model.embed_tokens.lora_embedding_B"]
            @ t[f"{p}model.embed_tokens.lora_embedding_A"]
        ).T
        * s
    )
    head = (
        t[f"{p}lm_head.base_layer.weight"]
        + (t[f"{p}lm_head.lora_B.weight"] @ t[f"{p}lm_head.lora_A.weight"]) * s
    )
    got1, got2 = load_file(out / SHARD1), load_file(out / SHARD2)
    assert set(got1) == set(shard1) and set(got2) == set(shard2)
    np.testing.assert_allclose(got1["model.embed_tokens.weight"], emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got2["lm_head.weight"], head, rtol=1e-5, atol=1e-5)
    for src, got in ((shard1, got1), (shard2, got2)):
        for k, v in src.items():
            assert got[k].dtype == v.dtype, k
            if k not in ("model.embed_tokens.weight", "lm_head.weight"):
                np.testing.assert_array_equal(got[k], v)
    index = json.loads((out / cli_files.INDEX_NAME).read_text())
    total = sum(v.nbytes for v in [*got1.values(), *got2.values()])
    assert index["metadata"]["total_size"] == total
    assert (
        index["weight_map"] == json.loads((base / cli_files.INDEX_NAME).read_text())["weight_map"]
    )
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V1
    assert _hashes(base) == before


def test_inspect_lists_embedding_base_weights_as_embedding_layers(tmp_path, capsys):
    _, adapter, *_ = _resized_case(tmp_path)
    assert cli.main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("embedding layers:"))
    assert "model.embed_tokens" in line and "lm_head" in line
    assert "modules_to_save" not in text


# --------------------------------------------------------------------------------- 7: help


def _parsers(parser):
    import argparse

    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                yield from _parsers(p)


def test_help_is_clean_and_every_option_has_help(capsys):
    import argparse

    parser = cli.build_parser()
    seen = 0
    for p in _parsers(parser):
        for a in p._actions:
            seen += 1
            assert a.help and a.help != argparse.SUPPRESS, (p.prog, a.dest)
    assert seen > 15
    for argv in (["--help"], ["demo", "--help"], ["inspect", "--help"], ["merge", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text and text.startswith("usage: peftjax")


def test_demo_headline_prints_a_rank_only_for_ranked_methods():
    from peftjax.demo import headline

    assert " r=8 " in headline("lora", 8, 60, 1000, 10, 4, 16)
    assert "r=" not in headline("ia3", 8, 60, 1000, 10, 4, 16)
    assert "random" in headline("ia3", 8, 60, 1000, 10, 4, 16)
