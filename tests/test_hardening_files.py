"""Hardening of the file readers and writers (issue 7): the safetensors reader against the
reference implementation, file-type and link rules, plain adapter names, crash-safe
`save_pretrained` (kill tests), invalid regexes in configs, strict loading, embedding base
layers and relative checkpoint directories.

Each bad input asserts the error class, that the message names the file / key / field, and that
the caller's params and files are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peftjax as pj
from peftjax import io as pio

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "peft"


# ---------------------------------------------------------------------------------- helpers


def tree_snapshot(tree):
    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=pj.Adapted.__instancecheck__)
    return treedef, [repr(x) if isinstance(x, pj.Adapted) else np.array(x) for x in flat]


def assert_tree_unchanged(tree, snap):
    treedef, items = tree_snapshot(tree)
    assert treedef == snap[0]
    for a, b in zip(items, snap[1], strict=True):
        if isinstance(a, str):
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)


def dir_bytes(d: Path) -> dict[str, bytes]:
    """Every regular file under ``d`` (links as their target text), for "files untouched"."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = ("->" + os.readlink(p)).encode()
        elif p.is_file():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


def mlp_params(seed=0):
    k = np.random.default_rng(seed)
    return {
        "fc1": {
            "kernel": jnp.asarray(k.normal(size=(12, 20)), jnp.float32),
            "bias": jnp.zeros((20,), jnp.float32),
        },
        "fc2": {
            "kernel": jnp.asarray(k.normal(size=(20, 12)), jnp.float32),
            "bias": jnp.zeros((12,), jnp.float32),
        },
    }


def copy_fixture(case: str, dst: Path) -> Path:
    d = dst / case
    d.mkdir(parents=True)
    for f in (pio.WEIGHTS_NAME, pio.CONFIG_NAME):
        (d / f).write_bytes((FIX / case / f).read_bytes())
    return d


def base_of(case: str) -> dict:
    """The fixture's base model as Flax params (Linear -> kernel (in, out), Embedding)."""
    sd = load_file(str(FIX / case / "base.safetensors"))
    out: dict = {}
    for k, v in sd.items():
        *mods, p = k.split(".")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        if v.ndim == 2 and mods[-1] in ("emb", "embed_tokens"):
            node["embedding"] = jnp.asarray(v)
        elif v.ndim == 2:
            node["kernel"] = jnp.asarray(v.T)
        else:
            node[p] = jnp.asarray(v)
    return out


# ---------------------------------------------------------------------------------- 1. safetensors


def _st(header, data=b"", raw=None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


_A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
_D8 = np.arange(2, dtype=np.float32).tobytes()
_D16 = np.arange(4, dtype=np.float32).tobytes()


def _corpus() -> dict[str, bytes]:
    c = {
        "valid": _st({"a": _A, "b": _B}, _D16),
        "valid_metadata": _st({"__metadata__": {"format": "pt"}, "a": _A}, _D8),
        "valid_null_metadata": _st({"__metadata__": None, "a": _A}, _D8),
        "valid_empty": _st({}),
        "valid_zero_size": _st(
            {"a": _A, "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}}, _D8
        ),
        "valid_keys_out_of_offset_order": _st({"b": _B, "a": _A}, _D16),
        "valid_whitespace_padding": _st(None, _D8, raw=json.dumps({"a": _A}).encode() + b"   "),
        "valid_extra_field": _st({"a": {**_A, "x": [1, "y"]}}, _D8),
        "valid_scalar": _st({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, _D8[:4]),
        "valid_int_and_bool": _st(
            {
                "i": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "BOOL", "shape": [2], "data_offsets": [4, 6]},
            },
            b"\x07\0\0\0\x01\0",
        ),
        "metadata_list": _st({"__metadata__": ["x"], "a": _A}, _D8),
        "metadata_str": _st({"__metadata__": "pt", "a": _A}, _D8),
        "metadata_int_value": _st({"__metadata__": {"format": 1}, "a": _A}, _D8),
        "metadata_twice": _st(
            None,
            _D8,
            raw=b'{"__metadata__":{},"__metadata__":{},"a":' + json.dumps(_A).encode() + b"}",
        ),
        "shape_negative": _st({"a": {**_A, "shape": [-2]}}, _D8),
        "shape_float": _st({"a": {**_A, "shape": [2.0]}}, _D8),
        "shape_minus_zero": _st(
            None, b"", raw=b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'
        ),
        "shape_bool": _st({"a": {**_A, "shape": [True, 2]}}, _D8),
        "shape_str": _st({"a": {**_A, "shape": ["2"]}}, _D8),
        "offsets_overlap": _st({"a": _A, "b": {**_A, "data_offsets": [4, 12]}}, _D16[:12]),
        "offsets_gap": _st({"a": {**_A, "data_offsets": [4, 12]}}, b"\0" * 4 + _D8),
        "offsets_same": _st({"a": _A, "b": _A}, _D8),
        "offsets_reversed": _st({"a": {**_A, "data_offsets": [8, 0]}}, _D8),
        "offsets_three": _st({"a": {**_A, "data_offsets": [0, 8, 8]}}, _D8),
        "offsets_float": _st({"a": {**_A, "data_offsets": [0.0, 8]}}, _D8),
        "size_mismatch": _st({"a": {**_A, "shape": [3]}}, _D8),
        "trailing_bytes": _st({"a": _A}, _D8 + b"xy"),
        "trailing_bytes_empty": _st({}, b"x"),
        "short_data": _st({"a": _B}, _D8),
        "unknown_dtype": _st({"a": {**_A, "dtype": "F31"}}, _D8),
        "lowercase_dtype": _st({"a": {**_A, "dtype": "f32"}}, _D8),
        "missing_shape": _st({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, _D8),
        "tensor_not_object": _st({"a": [1, 2]}, _D8),
        "header_not_object": _st(None, b"", raw=b"[]"),
        "header_nan": _st(
            None, b"", raw=b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":NaN}}'
        ),
        "header_bad_utf8": _st(None, b"", raw=b'{"\xff":1}'),
        "header_lone_surrogate": _st(None, b"", raw=b'{"__metadata__":{"a":"\\ud800"}}'),
        "header_too_deep": _st(
            None,
            b"",
            raw=b'{"a":{"dtype":"F32","shape":[0],'
            b'"data_offsets":[0,0],"x":' + b"[" * 126 + b"]" * 126 + b"}}",
        ),
        "valid_deep_nesting": _st(
            None,
            b"",
            raw=b'{"a":{"dtype":"F32","shape":[0],'
            b'"data_offsets":[0,0],"x":' + b"[" * 125 + b"]" * 125 + b"}}",
        ),
        "header_nul_after": _st(None, _D8, raw=json.dumps({"a": _A}).encode() + b"\0"),
        "header_length_past_end": struct.pack("<Q", 1000) + b"{}",
        "header_length_huge": struct.pack("<Q", 2**63) + b"{}",
        "only_4_bytes": b"\x02\0\0\0",
        "empty_file": b"",
    }
    return c


def test_safetensors_reader_accepts_exactly_what_the_reference_accepts(tmp_path):
    corpus = _corpus()
    accepted = 0
    for name, blob in corpus.items():
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(blob)
        try:
            want = load_file(str(f))
        except Exception:  # the reference refuses it
            want = None
        try:
            got, _ = pio.read_safetensors(f)
        except pj.FormatError as e:
            assert str(f) in str(e), name
            got = None
        try:
            head = pio.read_safetensors_header(f)
        except pj.FormatError as e:
            assert str(f) in str(e), name
            head = None
        assert (got is None) == (want is None), (
            f"{name}: peftjax {'refuses' if got is None else 'accepts'}"
        )
        assert (head is None) == (want is None), f"{name}: header-only check disagrees"
        if want is not None:
            accepted += 1
            assert sorted(got) == sorted(want) == sorted(head), name
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (name, k)
                np.testing.assert_array_equal(got[k], want[k])
                assert head[k] == (want[k].shape, want[k].dtype), (name, k)
        assert f.read_bytes() == blob
    assert accepted == sum(n.startswith("valid") or n == "valid_deep_nesting" for n in corpus)
    # files written by the reference with every dtype numpy has are read back equal
    rng = np.random.default_rng(0)
    arrays = {
        d: (rng.normal(size=(3, 2)) * 10).astype(d)
        for d in (
            "float64",
            "float32",
            "float16",
            "int64",
            "int32",
            "int16",
            "int8",
            "uint8",
            "bool",
        )
    }
    save_file(arrays, str(tmp_path / "all.safetensors"), metadata={"k": "v"})
    got, meta = pio.read_safetensors(tmp_path / "all.safetensors")
    assert meta == {"k": "v"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype


def test_header_only_reader_reads_no_data(tmp_path, monkeypatch):
    """`read_safetensors_header` validates offsets against the file size, reading only the
    header: a sparse 1 GiB data section is never read."""
    n = 2**28
    h = json.dumps({"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    f = tmp_path / "big.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h)
        fh.truncate(8 + len(h) + 4 * n)
    assert pio.read_safetensors_header(f) == {"a": ((n,), np.dtype(np.float32))}
    with open(f, "r+b") as fh:
        fh.truncate(8 + len(h) + 4 * n + 1)
    with pytest.raises(pj.FormatError, match="trailing bytes"):
        pio.read_safetensors_header(f)


# ---------------------------------------------------------------------------------- shared


def adapter_tree(r=2, alpha=4, seed=0):
    """A LoRA adapter on `mlp_params(0)` with random (seeded) values in every array."""
    cfg = pj.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2"])
    p = pj.inject(mlp_params(0), cfg, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def node(x):
        if not isinstance(x, pj.Adapted):
            return x
        arrs = {
            k: jnp.asarray(rng.normal(size=v.shape), v.dtype)
            for k, v in x.arrays["default"].items()
        }
        return x.replace(arrays={**x.arrays, "default": arrs})

    return jax.tree_util.tree_map(node, p, is_leaf=pj.Adapted.__instancecheck__)


def adapter_state(tree, name="default"):
    """``{leaf path: (r, scaling, {array: numpy})}`` of adapter ``name``."""
    out = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=pj.Adapted.__instancecheck__)
    for kp, x in flat:
        if isinstance(x, pj.Adapted) and name in x.names:
            s = x.spec(name)
            arrs = {k: np.asarray(v) for k, v in x.arrays[name].items()}
            out[jax.tree_util.keystr(kp)] = (s.r, s.scaling, arrs)
    return out


def same_state(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        (r1, s1, x1), (r2, s2, x2) = a[k], b[k]
        if r1 != r2 or s1 != s2 or x1.keys() != x2.keys():
            return False
        if not all(np.array_equal(x1[n], x2[n]) for n in x1):
            return False
    return True


def rewrite_header(f: Path, edit) -> None:
    """Re-write a safetensors file with ``edit(header dict)`` applied (data bytes kept)."""
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    h = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n :])


def _meta_list(h):
    h["__metadata__"] = ["format", "pt"]


def _as_int32(h):
    h[pio.PREFIX + "fc1.lora_A.weight"]["dtype"] = "I32"


def _config_edit(**kw):
    def edit(d: Path):
        cfg = json.loads((d / pio.CONFIG_NAME).read_text())
        cfg.update(kw)
        (d / pio.CONFIG_NAME).write_text(json.dumps(cfg))

    return edit


BAD_FILES = [
    # (case, edit of the copied adapter dir, error, pattern the message must contain)
    (
        "lora_linear",
        lambda d: rewrite_header(d / pio.WEIGHTS_NAME, _meta_list),
        pj.FormatError,
        r"adapter_model\.safetensors.*__metadata__",
    ),
    (
        "lora_linear",
        lambda d: rewrite_header(d / pio.WEIGHTS_NAME, _as_int32),
        pj.FormatError,
        r"adapter_model\.safetensors.*fc1\.lora_A\.weight.*int32",
    ),
    (
        "lora_linear",
        _config_edit(target_modules="(fc1|fc2"),
        pj.ConfigError,
        r"adapter_config\.json.*target_modules",
    ),
    (
        "lora_linear",
        _config_edit(rank_pattern={"fc[1": 2}),
        pj.ConfigError,
        r"adapter_config\.json.*rank_pattern",
    ),
    (
        "ia3_mlp",
        _config_edit(target_modules="fc1|fc2", feedforward_modules="(fc2"),
        pj.ConfigError,
        r"adapter_config\.json.*feedforward_modules",
    ),
    (
        "lora_linear",
        _config_edit(exclude_modules="fc3["),
        pj.ConfigError,
        r"adapter_config\.json.*exclude_modules",
    ),
]


@pytest.mark.parametrize("case, edit, error, match", BAD_FILES)
def test_bad_files_raise_named_errors_and_touch_nothing(tmp_path, case, edit, error, match):
    d = copy_fixture(case, tmp_path)
    edit(d)
    params = base_of(case)
    snap, before = tree_snapshot(params), dir_bytes(d)
    with pytest.raises(error, match=match):
        pio.load_pretrained(params, d)
    with pytest.raises(error, match=match):
        pio.read_adapter(d)
    if error is not pj.FormatError or "int32" not in match:  # inspect reports dtypes
        with pytest.raises(error, match=match):
            pio.inspect_adapter(d)
    assert_tree_unchanged(params, snap)
    assert dir_bytes(d) == before


def test_invalid_regex_in_every_pattern_field_is_a_config_error():
    for field, kw in [
        ("target_modules", dict(target_modules="(a")),
        ("exclude_modules", dict(target_modules=["a"], exclude_modules="[b")),
        ("modules_to_save", dict(target_modules=["a"], modules_to_save=["(h"])),
        ("layers_pattern", dict(target_modules=["a"], layers_to_transform=[0], layers_pattern="(")),
        ("rank_pattern", dict(target_modules=["a"], rank_pattern={"a)": 2})),
        ("alpha_pattern", dict(target_modules=["a"], alpha_pattern={"*a": 2})),
    ]:
        with pytest.raises(pj.ConfigError, match=field):
            pj.LoraConfig.from_dict({"peft_type": "LORA", **kw})
        with pytest.raises(pj.ConfigError, match=field):
            pj.LoHaConfig(**kw)
    with pytest.raises(pj.ConfigError, match="feedforward_modules"):
        pj.IA3Config(target_modules="a|b", feedforward_modules="(b")


# ---------------------------------------------------------------------------------- 3. file types


def _hub_layout(tmp_path: Path) -> Path:
    """An HF hub cache snapshot: both files are links into the repo's ``blobs/``."""
    repo = tmp_path / "models--x--y"
    snap = repo / "snapshots" / "rev"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in (pio.WEIGHTS_NAME, pio.CONFIG_NAME):
        data = (FIX / "lora_linear" / f).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def _call_bounded(fn, seconds=20.0):
    """``fn()``'s exception (or None), failing the test if it does not return in time."""
    box: list = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"still running after {seconds} s (blocked on a special file?)"
    return box[0]


@pytest.mark.parametrize("which", [pio.WEIGHTS_NAME, pio.CONFIG_NAME])
def test_special_files_and_links_out_are_refused(tmp_path, which):
    params = base_of("lora_linear")
    snap = tree_snapshot(params)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes((FIX / "lora_linear" / which).read_bytes())
    for kind in ("dev_zero", "fifo", "outside", "dangling"):
        d = copy_fixture("lora_linear", tmp_path / kind)
        (d / which).unlink()
        if kind == "dev_zero":
            (d / which).symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(d / which)
        elif kind == "outside":
            (d / which).symlink_to(outside)
        else:
            (d / which).symlink_to(d / "nope")
        before = dir_bytes(d)
        for call in (
            lambda d=d: pio.load_pretrained(params, d),
            lambda d=d: pio.read_adapter(d),
            lambda d=d: pio.inspect_adapter(d),
        ):
            err = _call_bounded(call)
            assert isinstance(err, pj.FormatError), (kind, err)
            assert which in str(err), (kind, str(err))
        assert dir_bytes(d) == before
    assert_tree_unchanged(params, snap)


def test_links_inside_the_directory_and_hub_snapshots_load(tmp_path):
    params = base_of("lora_linear")
    want = adapter_state(pio.load_pretrained(params, FIX / "lora_linear"))
    d = copy_fixture("lora_linear", tmp_path)
    (d / pio.WEIGHTS_NAME).rename(d / "real.safetensors")
    (d / pio.WEIGHTS_NAME).symlink_to("real.safetensors")
    assert same_state(adapter_state(pio.load_pretrained(params, d)), want)
    snap = _hub_layout(tmp_path)
    assert same_state(adapter_state(pio.load_pretrained(params, snap)), want)
    assert pio.inspect_adapter(snap)["targets"] == ["fc1", "fc2"]
    assert pio.read_adapter(snap)[0].r == 4


# ---------------------------------------------------------------------------------- 4. names


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs/x", ".", "..", ""])
def test_adapter_names_must_be_plain(tmp_path, bad):
    tree = adapter_tree()
    snap = tree_snapshot(tree)
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises((pj.FormatError, pj.AdapterNameError), match="name"):
        pio.save_pretrained(tree, out, name=bad)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not Path("/abs").exists() or bad != "/abs/x"
    if bad:
        with pytest.raises(pj.FormatError, match="name"):
            pio.load_pretrained(mlp_params(0), out, name=bad)
    assert_tree_unchanged(tree, snap)


# ---------------------------------------------------------------------------------- 5. crash safety

_SAVE_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import jax
import numpy as np
from tests.test_hardening_files import adapter_tree
from peftjax import io as pio

# numpy leaves: the forked savers below run no JAX computation (fork-safe), only numpy and os
params = jax.tree_util.tree_map(np.asarray, adapter_tree(r=4, alpha=16, seed=1))
for n, d in {points!r}:
    pid = os.fork()
    if pid == 0:
        count = [0]

        def wrap(fn):
            def call(*a, **k):
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)

            return call

        for name in ("replace", "rename", "fsync", "unlink"):
            setattr(os, name, wrap(getattr(os, name)))
        pio.save_pretrained(params, d)
        print("events", count[0], flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("point", n, "signal" if os.WIFSIGNALED(status) else "exit",
          os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""

#: the file-system steps of one save (see io's docstring): 1 fsync weights, 2 fsync config,
#: 3 fsync journal, 4 rename journal (the commit), 5 fsync dir, 6 rename weights, 7 rename
#: config, 8 fsync dir, 9 unlink journal, 10 fsync dir. A kill before step N <= 4 leaves the old
#: adapter, a later one the new.
_SAVE_EVENTS = 10


def _run_children(scripts: list[str], timeout=120) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", s],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        for s in scripts
    ]
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a kill-test child ran past its time limit")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


@pytest.mark.slow
def test_save_pretrained_killed_at_every_step_leaves_old_or_new(tmp_path):
    """SIGKILL before each of a save's file-system steps (one child process, which forks a
    saver per kill point); every outcome loads as exactly the old or exactly the new adapter."""
    old_tree, new_tree = adapter_tree(2, 4, 0), adapter_tree(4, 16, 1)
    old, new = adapter_state(old_tree), adapter_state(new_tree)
    assert not same_state(old, new)
    kills = list(range(1, _SAVE_EVENTS + 1))
    points = [(n, str(tmp_path / f"kill{n}")) for n in [*kills, 10**6]]
    for _, d in points:
        pio.save_pretrained(old_tree, d)
    (res,) = _run_children([_SAVE_CHILD.format(root=str(ROOT), points=points)])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    assert f"events {_SAVE_EVENTS}" in lines  # the uninterrupted save: the kills cover each step
    for n in kills:
        assert f"point {n} signal 9" in lines, (n, res.stdout)
    assert "point 1000000 exit 0" in lines
    base = mlp_params(0)
    for n, d in points:
        d = Path(d)
        got = adapter_state(pio.load_pretrained(base, d))
        want = old if n <= 4 else new
        assert same_state(got, want), f"kill at step {n}: not the {'old' if n <= 4 else 'new'} one"
        assert sorted(os.listdir(d)) == [pio.CONFIG_NAME, pio.WEIGHTS_NAME], n  # recovered
    d = Path(points[5][1])
    pio.save_pretrained(old_tree, d)
    assert sorted(os.listdir(d)) == [pio.CONFIG_NAME, pio.WEIGHTS_NAME]
    assert same_state(adapter_state(pio.load_pretrained(base, d)), old)


def test_torn_pair_from_other_tools_is_refused_by_the_digest(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pio.save_pretrained(adapter_tree(2, 4, 0), a)
    pio.save_pretrained(adapter_tree(4, 16, 1), b)
    # PEFT-loadable metadata: format pt plus the digest
    meta = pio.read_safetensors(a / pio.WEIGHTS_NAME)[1]
    assert meta["format"] == "pt" and len(meta[pio.DIGEST_KEY]) == 64
    # bookkeeping edits keep the digest; a config from another save does not
    cfg = json.loads((a / pio.CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = "org/model"
    (a / pio.CONFIG_NAME).write_text(json.dumps(cfg))
    pio.load_pretrained(mlp_params(0), a)
    (a / pio.CONFIG_NAME).write_bytes((b / pio.CONFIG_NAME).read_bytes())
    params, before = mlp_params(0), dir_bytes(a)
    snap = tree_snapshot(params)
    for call in (pio.load_pretrained, lambda p, d: pio.read_adapter(d)):
        with pytest.raises(pj.FormatError, match=r"adapter_model\.safetensors.*different"):
            call(params, a)
    assert_tree_unchanged(params, snap)
    assert dir_bytes(a) == before


def test_stray_temp_files_without_journal_are_removed(tmp_path):
    d = tmp_path / "a"
    pio.save_pretrained(adapter_tree(), d)
    (d / ".peftjax-tmp-abc.adapter_model.safetensors").write_bytes(b"half")
    (d / ".adapter_config.json.xyz.tmp").write_bytes(b"{")  # an older peftjax's temp name
    (d / "notes.tmp").write_bytes(b"mine")  # not peftjax's: kept
    pio.load_pretrained(mlp_params(0), d)
    assert sorted(os.listdir(d)) == [pio.CONFIG_NAME, pio.WEIGHTS_NAME, "notes.tmp"]


_CKPT_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import optax
import peftjax as pj
from tests.test_hardening_files import adapter_tree

params = adapter_tree(2, 4, 1)
opt_state = optax.adam(1e-2).init(pj.partition(params)[0])
count = [0]
real = os.rename


def rename(*a, **k):
    count[0] += 1
    if count[0] == {n} and not {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*a, **k)
    if count[0] == {n} and {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


os.rename = rename
ck = pj.AdapterCheckpointer({d!r})
ck.save(2, params, opt_state)
ck.wait_until_finished()
print("renames", count[0])
"""


@pytest.mark.slow
def test_checkpointer_killed_during_save_restores_a_whole_step(tmp_path):
    import optax

    old_tree, new_tree = adapter_tree(2, 4, 0), adapter_tree(2, 4, 1)
    opt = optax.adam(1e-2)
    kills = [(2, False), (4, False), (4, True)]  # Orbax commits at its 4th (last) rename
    dirs = []
    for i, _ in enumerate(kills):
        d = tmp_path / f"ck{i}"
        with pj.AdapterCheckpointer(d) as ck:
            ck.save(1, old_tree, opt.init(pj.partition(old_tree)[0]))
        dirs.append(d)
    scripts = [
        _CKPT_CHILD.format(root=str(ROOT), n=n, after=after, d=str(d))
        for (n, after), d in zip(kills, dirs)
    ]
    results = _run_children(scripts)
    like = opt.init(pj.partition(old_tree)[0])
    for (n, after), d, res in zip(kills, dirs, results):
        assert res.returncode == -9, (n, res.stderr[-2000:])
        with pj.AdapterCheckpointer(d) as ck:
            params, _, step = ck.restore(old_tree, like)
        want = new_tree if after else old_tree
        assert step == (2 if after else 1), (n, after, step)
        assert same_state(adapter_state(params), adapter_state(want)), (n, after)


# ---------------------------------------------------------------------------------- 7. strict


def test_strict_names_targeted_modules_the_file_lacks(tmp_path):
    params = base_of("lora_linear")
    snap = tree_snapshot(params)
    for targets in (["fc1", "fc2"], "fc.", "all-linear"):
        d = copy_fixture("lora_linear", tmp_path / str(len(str(targets))))
        t = load_file(str(d / pio.WEIGHTS_NAME))
        save_file(
            {k: v for k, v in t.items() if ".fc2." not in k},
            str(d / pio.WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        _config_edit(target_modules=targets)(d)
        before = dir_bytes(d)
        with pytest.raises(pj.FormatError, match=r"adapter_config\.json.*\['fc2'\]"):
            pio.load_pretrained(params, d)
        assert dir_bytes(d) == before
        loaded = pio.load_pretrained(params, d, strict=False)
        assert pj.targeted_modules(loaded) == ["fc1"]
    assert_tree_unchanged(params, snap)


# ---------------------------------------------------------------------------------- 8. embeddings


def test_embedding_base_layers_round_trip(tmp_path):
    d = copy_fixture("lora_embedding", tmp_path)
    t = load_file(str(d / pio.WEIGHTS_NAME))
    vocab = np.arange(50 * 16, dtype=np.float32).reshape(50, 16) / 7
    key = pio.PREFIX + "emb.base_layer.weight"
    save_file({**t, key: vocab}, str(d / pio.WEIGHTS_NAME), metadata={"format": "pt"})
    info = pio.inspect_adapter(d)
    assert info["embedding_layers"] == ["emb"] and info["modules_to_save"] == []
    assert info["targets"] == ["emb"]
    tensors = pio.read_adapter(d)[1]
    assert pio.embedding_base_keys(tensors, "LORA") == {"emb.weight": key}
    params = base_of("lora_embedding")
    loaded = pio.load_pretrained(params, d)
    out = pio.save_pretrained(loaded, tmp_path / "back")
    got, _ = pio.read_safetensors(out / pio.WEIGHTS_NAME)
    want = load_file(str(d / pio.WEIGHTS_NAME))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    # save_embedding_layers=False drops them; True writes them for a fresh adapter too
    pio.save_pretrained(loaded, tmp_path / "no", save_embedding_layers=False)
    assert key not in pio.read_safetensors(tmp_path / "no" / pio.WEIGHTS_NAME)[0]
    fresh = pj.inject(params, pj.LoraConfig(r=2, target_modules=["emb"]), key=jax.random.key(0))
    pio.save_pretrained(fresh, tmp_path / "auto")
    assert key not in pio.read_safetensors(tmp_path / "auto" / pio.WEIGHTS_NAME)[0]
    pio.save_pretrained(fresh, tmp_path / "yes", save_embedding_layers=True)
    yes = pio.read_safetensors(tmp_path / "yes" / pio.WEIGHTS_NAME)[0]
    np.testing.assert_array_equal(yes[key], np.asarray(params["emb"]["embedding"]))


# ---------------------------------------------------------------------------------- 9. checkpoints


def test_checkpointer_with_a_relative_directory(tmp_path, monkeypatch):
    import optax

    monkeypatch.chdir(tmp_path)
    params = adapter_tree()
    opt_state = optax.adam(1e-2).init(pj.partition(params)[0])
    ckpt = pj.AdapterCheckpointer("runs/ckpt", max_to_keep=3)
    assert Path(str(ckpt.directory)).is_absolute()
    ckpt.save(3, params, opt_state)
    got, _, step = ckpt.restore(params, opt_state)
    ckpt.close()
    assert step == 3 and same_state(adapter_state(got), adapter_state(params))
    assert sorted(os.listdir(tmp_path / "runs" / "ckpt")) == ["3"]


def test_load_pretrained_is_trainable(tmp_path):
    """PEFT's files always say ``inference_mode: true``; that alone does not freeze a loaded
    adapter (training after a load keeps working), ``is_trainable=False`` does (PEFT's default)."""
    p = {"q": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
    a = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q"]), key=jax.random.key(0))
    pj.save_pretrained(a, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    live = pj.load_pretrained(p, tmp_path)
    frozen = pj.load_pretrained(p, tmp_path, is_trainable=False)
    assert pj.count_parameters(live)[0] == 2 * (4 + 6)
    assert pj.count_parameters(frozen)[0] == 0
    assert jax.tree_util.tree_leaves(pj.partition(frozen)[0]) == []
    # frozen still acts in the forward pass, and set_trainable unfreezes it
    assert pj.count_parameters(pj.set_trainable(frozen, "default"))[0] == 2 * (4 + 6)
