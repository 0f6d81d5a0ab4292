"""VeRA against HF PEFT 0.21.2: bit-exact shared projections, PEFT's files in and out, outputs
and merged weights of PEFT's fixtures (also through transformers' Flax Llama), the shared
projections' place in the tree (one holder, frozen, not counted), several adapters, errors.
Tiny shapes; the generic invariants run over VeRA's rows of ``tests/cases.py``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from peftjax import cli, forward as pjf, io as pio
from peftjax.methods.vera import VeraSpec, mt19937_words, projections
from tests import reference_more as rm
from tests.conftest import STACKED_LAYOUT, make_conv, make_llama, make_mlp, make_stacked
from tests.test_cli import _checkpoint
from tests.test_io import (
    FIX,
    assert_trees_close,
    base_params,
    copy_case,
    flax_from_torch,
    io_data,
    rewrite_weights,
)

MLP_CASES = ["vera_mlp", "vera_mlp_noproj"]
CASES = [*MLP_CASES, "llama_vera"]
KEY = jax.random.key(0)
RBG = jax.random.key(0, impl="unsafe_rbg")  # compiles faster than threefry


def mlp(p, x):
    """The fixtures' ``fc2(relu(fc1(x)))``."""
    h = jnp.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def vera_leaves(tree, name="default") -> dict[str, dict]:
    """``{keystr: arrays}`` of adapter ``name`` on every adapted leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=pj.Adapted.__instancecheck__)
    return {
        jax.tree_util.keystr(kp): x.arrays[name]
        for kp, x in flat
        if isinstance(x, pj.Adapted) and name in x.names
    }


def holder_arrays(tree, name="default") -> dict:
    (arrays,) = [a for a in vera_leaves(tree, name).values() if "vera_A" in (a or {})]
    return arrays


def count_named(tree, leaf_name: str) -> int:
    """How many pytree leaves of ``tree`` are named ``leaf_name``."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return sum(1 for kp, _ in flat if getattr(kp[-1], "key", None) == leaf_name)


@pytest.fixture(scope="module")
def loaded():
    return {c: pio.load_pretrained(base_params(c), FIX / c) for c in CASES}


# ------------------------------------------------------------------------------ projections


def test_mt19937_is_the_reference_stream():
    np.testing.assert_array_equal(mt19937_words(1234, 777), rm.mt19937_words(1234, 777))
    # MT19937's published first output for init_genrand(5489)
    assert int(mt19937_words(5489, 1)[0]) == 3499211612


def test_projections_bit_equal_peft():
    d = FIX / "vera_projection_bits"
    want = load_file(str(d / "projections.safetensors"))
    for c in json.loads((d / "projections.json").read_text())["cases"]:
        a, b = projections(c["seed"], c["r"], c["in_max"], c["out_max"])
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, want[c["key"] + ".vera_A"], err_msg=c["key"])
        np.testing.assert_array_equal(b, want[c["key"] + ".vera_B"], err_msg=c["key"])


@pytest.mark.parametrize("case", CASES)
def test_loaded_and_injected_projections_are_peft_s(case, loaded):
    io = io_data(case)
    for tree in (
        loaded[case],
        pj.inject(base_params(case), pio.read_adapter(FIX / case)[0], key=RBG),
    ):
        h = holder_arrays(tree)
        # Flax orientation: vera_A (in_max, r), vera_B (r, out_max)
        np.testing.assert_array_equal(np.asarray(h["vera_A"]).T, io["vera_A"])
        np.testing.assert_array_equal(np.asarray(h["vera_B"]).T, io["vera_B"])


# ------------------------------------------------------------------------------ PEFT's fixtures


@pytest.mark.parametrize("case", MLP_CASES)
def test_fixture_outputs_and_merge(case, loaded):
    q, io, params = loaded[case], io_data(case), base_params(case)
    x = jnp.asarray(io["x"])
    np.testing.assert_allclose(pj.apply(mlp)(q, x), io["y_adapted"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mlp(pj.unload(q), x), io["y_base"], atol=1e-5, rtol=1e-5)
    merged = pj.merge_and_unload(q)
    assert_trees_close(merged, flax_from_torch(io, "merged."))
    np.testing.assert_allclose(mlp(merged, x), io["y_adapted"], atol=1e-5, rtol=1e-5)
    assert_trees_close(pj.unload(pj.unmerge(pj.merge(q))), params)
    # the NumPy oracle on PEFT's saved tensors agrees (torch layout)
    t = load_file(str(FIX / case / pio.WEIGHTS_NAME))
    A, B = io["vera_A"], io["vera_B"]
    lam = lambda m, k: t[f"base_model.model.{m}.vera_lambda_{k}"]  # noqa: E731
    W = {m: np.asarray(params[m]["kernel"]).T for m in ("fc1", "fc2")}
    h = np.maximum(
        rm.vera_forward(
            io["x"], W["fc1"], params["fc1"]["bias"], A, B, lam("fc1", "b"), lam("fc1", "d")
        ),
        0,
    )
    y = rm.vera_forward(h, W["fc2"], params["fc2"]["bias"], A, B, lam("fc2", "b"), lam("fc2", "d"))
    np.testing.assert_allclose(y, io["y_adapted"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_llama_through_hf_flax_model(loaded):
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((FIX / "llama_vera" / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)
    q, io = loaded["llama_vera"], io_data("llama_vera")
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    fn = lambda p, i: model(i, params=p).logits  # noqa: E731
    tol = dict(atol=1e-4, rtol=1e-4)
    # unmerged, through the third-party model (projections found from `pj.apply`'s own tree)
    np.testing.assert_allclose(jax.jit(pj.apply(fn))(q, ids), io["logits_adapted"], **tol)
    assert_trees_close(pj.merge_and_unload(q), flax_from_torch(io, "merged."))


@pytest.mark.parametrize("case", CASES)
def test_saves_back_peft_s_tensors_and_config(case, loaded, tmp_path):
    fixture_cfg = json.loads((FIX / case / pio.CONFIG_NAME).read_text())
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    config = pio.read_adapter(FIX / case)[0]
    for sub, kw in (("rebuilt", {}), ("given", {"config": config})):
        out = pio.save_pretrained(loaded[case], tmp_path / sub, **kw)
        got, _ = pio.read_safetensors(out / pio.WEIGHTS_NAME)
        assert sorted(got) == sorted(want)
        if fixture_cfg["save_projection"]:
            assert {"base_model.vera_A", "base_model.vera_B"} <= set(got)
        for k in want:
            assert got[k].dtype == np.float32, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        saved = json.loads((out / pio.CONFIG_NAME).read_text())
        ref = dict(fixture_cfg)
        targets = set(saved.pop("target_modules"))
        ref_targets = set(ref.pop("target_modules"))
        if sub == "given":
            assert targets == ref_targets
        else:  # exact module paths, each ending in one of PEFT's names
            assert {t.rsplit(".", 1)[-1] for t in targets} == ref_targets
        saved.pop("auto_mapping"), ref.pop("auto_mapping")
        assert saved == ref
        assert "exclude_modules" not in saved  # not a field of PEFT's VeraConfig
        # and it loads back to the same adapter
        again = pio.load_pretrained(base_params(case), out)
        assert_trees_close(pj.merge_and_unload(again), pj.merge_and_unload(loaded[case]), atol=0)


def test_file_without_projections_regenerates_them(tmp_path):
    # save_projection=False: only lambdas in the file; loading regenerates A/B from the key
    q = pj.inject(
        make_mlp()["params"],
        pj.VeraConfig(
            r=4,
            target_modules=["fc1", "fc2"],
            save_projection=False,
            projection_prng_key=7,
            init_weights=False,
        ),
        key=RBG,
    )
    out = pio.save_pretrained(q, tmp_path / "a")
    keys = set(pio.read_safetensors(out / pio.WEIGHTS_NAME)[0])
    assert keys == {f"base_model.model.{m}.vera_lambda_{k}" for m in ("fc1", "fc2") for k in "bd"}
    back = pio.load_pretrained(make_mlp()["params"], out)
    assert_trees_close(pj.merge_and_unload(back), pj.merge_and_unload(q), atol=0)
    a, _ = projections(7, 4, 20, 20)
    np.testing.assert_array_equal(np.asarray(holder_arrays(back)["vera_A"]).T, a)


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_inspect_and_cli_merge(tmp_path):
    info = pio.inspect_adapter(FIX / "llama_vera")
    assert info["method"] == "vera" and info["modules_to_save"] == []  # shared keys: no module
    assert len(info["targets"]) == 6
    # `peftjax merge` folds module by module: each brings the projections' holder along
    base = _checkpoint(tmp_path, "llama_vera", 3)
    out = tmp_path / "out"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(FIX / "llama_vera"),
                     "--out", str(out)]) == 0  # fmt: skip
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    want = {
        k[len("merged.") :]: v for k, v in io_data("llama_vera").items() if k.startswith("merged.")
    }
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------ the tree


def test_one_holder_and_slices():
    p = make_llama()
    q = pj.inject(p, pj.VeraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]), key=RBG)
    leaves = vera_leaves(q)
    assert len(leaves) == 9  # 3 layers x 3 modules
    assert count_named(q, "vera_A") == count_named(q, "vera_B") == 1  # once in the whole tree
    h = holder_arrays(q)
    # (in_max, out_max) = elementwise max of (16, 16), (16, 8), (24, 16); Flax orientation
    assert h["vera_A"].shape == (24, 3) and h["vera_B"].shape == (3, 16)
    a, b = projections(0, 3, 24, 16)
    np.testing.assert_array_equal(np.asarray(h["vera_A"]), a.T)
    np.testing.assert_array_equal(np.asarray(h["vera_B"]), b.T)
    # the holder is the first module in tree order (keys sorted: mlp before self_attn)
    first = q["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert first.spec("default").shared_holder() is None and "vera_A" in first.arrays["default"]
    v = q["params"]["model"]["layers"]["2"]["self_attn"]["v_proj"]["kernel"]
    assert v.spec("default").shared_holder() == "model.layers.0.mlp.down_proj"
    assert set(v.arrays["default"]) == {"vera_lambda_b", "vera_lambda_d"}
    assert v.arrays["default"]["vera_lambda_b"].shape == (8,)
    # each module's delta uses PEFT's slices A[:, :in], B[:out, :]
    qr = pj.inject(
        p, pj.VeraConfig(r=3, target_modules=["v_proj", "down_proj"], init_weights=False), key=2
    )
    hr = holder_arrays(qr)
    A, B = np.asarray(hr["vera_A"]).T, np.asarray(hr["vera_B"]).T
    merged = pj.merge_and_unload(qr)
    for m in ("self_attn.v_proj", "mlp.down_proj"):
        g, n = m.split(".")
        node = qr["params"]["model"]["layers"]["1"][g][n]["kernel"]
        lb, ld = (np.asarray(node.arrays["default"][f"vera_lambda_{k}"]) for k in "bd")
        W = np.asarray(node.base).T
        want = rm.vera_merge(W, A, B, lb, ld).T
        got = merged["params"]["model"]["layers"]["1"][g][n]["kernel"]
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_init_as_peft():
    p = make_mlp()["params"]
    q = pj.inject(p, pj.VeraConfig(r=5, d_initial=0.25, target_modules=["fc1", "fc2"]), key=RBG)
    for a in vera_leaves(q).values():
        assert not np.asarray(a["vera_lambda_b"]).any()
        np.testing.assert_array_equal(a["vera_lambda_d"], np.full(5, 0.25, np.float32))
    q = pj.inject(p, pj.VeraConfig(r=5, init_weights=False, target_modules=["fc1"]), key=RBG)
    (a,) = vera_leaves(q).values()
    np.testing.assert_array_equal(a["vera_lambda_b"], np.ones(20, np.float32))
    assert np.asarray(a["vera_lambda_d"]).std() > 0


def test_partition_grad_optimizer_and_counts(loaded):
    q = pj.set_trainable(loaded["vera_mlp"], "default")
    t, f = pj.partition(q)
    # the projections stay in the frozen half; only the lambdas train
    assert count_named(t, "vera_A") == count_named(t, "vera_B") == 0
    assert count_named(f, "vera_A") == count_named(f, "vera_B") == 1
    assert sorted(x.shape for x in jax.tree_util.tree_leaves(t)) == [(4,), (4,), (12,), (20,)]
    x = jnp.asarray(io_data("vera_mlp")["x"])
    loss = lambda t: jnp.sum(pj.apply(mlp)(pj.combine(t, f), x) ** 2)  # noqa: E731
    g = jax.grad(loss)(t)
    assert count_named(g, "vera_A") == 0
    assert all(np.abs(np.asarray(v)).max() > 0 for v in jax.tree_util.tree_leaves(g))
    state = optax.adam(1e-2).init(t)
    assert count_named(state, "vera_A") == count_named(state, "vera_B") == 0
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * 40 + 1
    # the mask and the single-tree optimizer agree: projections get no update
    mask = pj.trainable_mask(q)
    assert holder_arrays(mask)["vera_A"] is False and holder_arrays(mask)["vera_lambda_b"] is True
    # PEFT's count: the lambdas (fc1 20 + 4, fc2 12 + 4); the buffers are not parameters
    base = sum(x.size for x in jax.tree_util.tree_leaves(base_params("vera_mlp")))
    assert pj.count_parameters(q) == (40, base + 40)
    q2 = pj.set_trainable(loaded["llama_vera"], "default")
    base2 = sum(x.size for x in jax.tree_util.tree_leaves(base_params("llama_vera")))
    assert pj.count_parameters(q2) == (2 * (40 + 24 + 40), base2 + 208)


def test_frozen_arrays_refused_as_trainable(loaded):
    q = pj.set_trainable(loaded["vera_mlp"], "default")
    t, f = pj.partition(q)
    node = q["fc1"]["kernel"]
    bad = jax.tree_util.tree_map(lambda x: x, t, is_leaf=pj.Adapted.__instancecheck__)
    tn = bad["fc1"]["kernel"]
    bad["fc1"]["kernel"] = tn.replace(
        arrays={"default": {**tn.arrays["default"], "vera_A": node.arrays["default"]["vera_A"]}}
    )
    with pytest.raises(pj.PartitionError, match=r"fc1.*vera_A.*never train"):
        pj.combine(bad, f)
    # the whole tree as `trainable` (projections included) is refused as well
    with pytest.raises(pj.PartitionError):
        pj.combine(q, f)


# ------------------------------------------------------------------------------ forward


def test_dropout_and_fused_paths(monkeypatch):
    p = make_mlp()["params"]
    cfg = pj.VeraConfig(r=4, vera_dropout=0.5, init_weights=False, target_modules=["fc1", "fc2"])
    q = pj.inject(p, cfg, key=RBG)
    calls = []
    orig = pjf._effective
    monkeypatch.setattr(pjf, "_effective", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 12)), jnp.float32)

    def run(q, k):
        loss = lambda q: jnp.sum(pj.apply(mlp, rng=k)(q, x))  # noqa: E731
        # eval (64 tokens: may run fused, x @ (W + dW)), dropout, and its gradient
        return pj.apply(mlp)(q, x), pj.apply(mlp, rng=k)(q, x), jax.grad(loss)(q)

    y, yd, g = jax.jit(run)(q, jax.random.key(1, impl="unsafe_rbg"))
    assert not calls  # never the W + dW fallback
    np.testing.assert_allclose(y, mlp(pj.merge_and_unload(q), x), atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(yd)).all() and not np.allclose(yd, y, atol=1e-3)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_stacked_scan_and_layers_to_transform(monkeypatch):
    p = make_stacked()["params"]

    def fn(p, x):
        def body(h, w):
            q, d = w
            return jnp.tanh(h @ q) + jnp.tanh(jnp.concatenate([h, h[:, :8]], -1) @ d), None

        lay = p["layers"]
        return jax.lax.scan(
            body, x, (lay["self_attn"]["q_proj"]["kernel"], lay["mlp"]["down_proj"]["kernel"])
        )[0]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16)), jnp.float32)
    calls = []
    orig = pjf._effective
    monkeypatch.setattr(pjf, "_effective", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for ltt in (None, [0, 2]):
        cfg = pj.VeraConfig(
            r=3, init_weights=False, layers_to_transform=ltt, target_modules=["q_proj", "down_proj"]
        )
        q = pj.inject(p, cfg, key=RBG, layouts=STACKED_LAYOUT)
        h = holder_arrays(q)
        assert h["vera_A"].shape == (24, 3) and h["vera_B"].shape == (3, 16)  # no layer axis
        n = 3 if ltt is None else 2
        assert h["vera_lambda_b"].shape == (n, 16)
        # merge: per layer, PEFT's merge with the shared slices; other layers untouched
        merged = pj.merge_and_unload(q)
        A, B = np.asarray(h["vera_A"]).T, np.asarray(h["vera_B"]).T
        node = q["layers"]["mlp"]["down_proj"]["kernel"]
        a, stored = node.arrays["default"], node.spec("default").stored_layers
        w, got = p["layers"]["mlp"]["down_proj"]["kernel"], merged["layers"]["mlp"]["down_proj"]
        for i in range(3):
            if i not in stored:
                np.testing.assert_array_equal(got["kernel"][i], w[i])
                continue
            j = stored.index(i)
            lb, ld = np.asarray(a["vera_lambda_b"][j]), np.asarray(a["vera_lambda_d"][j])
            want = rm.vera_merge(np.asarray(w[i]).T, A, B, lb, ld).T
            np.testing.assert_allclose(got["kernel"][i], want, atol=1e-5)
    # the scanned forward and its gradient on the compact (layers_to_transform) storage: the
    # adapter runs factored inside the scan, the projections broadcast to every layer slice
    t, f = pj.partition(q)
    calls.clear()
    both = jax.jit(
        lambda t, f: (
            pj.apply(fn)(pj.combine(t, f), x),
            jax.grad(lambda t: pj.apply(fn)(pj.combine(t, f), x).sum())(t),
        )
    )
    y, g = both(t, f)
    assert not calls and count_named(g, "vera_lambda_d") and not count_named(g, "vera_A")
    np.testing.assert_allclose(y, jax.jit(fn)(merged, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ several adapters


def test_later_adapters_use_the_first_s_projections():
    p = make_mlp()["params"]
    q = pj.inject(p, pj.VeraConfig(r=4, target_modules=["fc1", "fc2"], init_weights=False), key=RBG)
    # a later adapter on fc1 only: PEFT's projections are the first's (20, 20), not (12, 20)
    q = pj.inject(
        q, pj.VeraConfig(r=4, target_modules=["fc1"], init_weights=False), key=RBG, name="b"
    )
    hb = holder_arrays(q, "b")
    np.testing.assert_array_equal(hb["vera_A"], holder_arrays(q)["vera_A"])
    np.testing.assert_array_equal(hb["vera_B"], holder_arrays(q)["vera_B"])
    assert hb["vera_A"].shape == (20, 4)
    assert count_named(q, "vera_A") == 2  # one per adapter
    a_small, _ = projections(0, 4, 12, 20)  # what sizing "b" on its own would give
    assert not np.array_equal(np.asarray(hb["vera_A"]).T[:, :12], a_small)
    # "b" works on its own: merge == factored forward, with the first's slices
    qb = pj.set_active(q, "b")
    x = jnp.ones((3, 12))
    np.testing.assert_allclose(pj.apply(mlp)(qb, x), mlp(pj.merge_and_unload(qb), x), atol=1e-5)
    lb, ld = (np.asarray(q["fc1"]["kernel"].arrays["b"][f"vera_lambda_{k}"]) for k in "bd")
    A, B = projections(0, 4, 20, 20)
    want = rm.vera_merge(np.asarray(p["fc1"]["kernel"]).T, A, B, lb, ld).T
    np.testing.assert_allclose(pj.merge_and_unload(qb)["fc1"]["kernel"], want, atol=1e-5)
    # deleting the first leaves "b" whole (it holds its own copy)
    d = pj.delete(q, "default")
    np.testing.assert_allclose(pj.apply(mlp)(d, x), pj.apply(mlp)(qb, x), atol=1e-6)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"projection_prng_key": 1}, r"projection_prng_key.*'default'.*same"),
        ({"save_projection": False}, r"save_projection.*same"),
        ({"r": 2}, r"`r`=2.*r=4"),
        ({"r": 8}, r"`r`=8.*larger"),
    ],
)
def test_later_adapter_must_match_the_first(kw, match):
    p = make_mlp()["params"]
    q = pj.inject(p, pj.VeraConfig(r=4, target_modules=["fc1", "fc2"]), key=RBG)
    with pytest.raises(pj.ConfigError, match=match):
        pj.inject(q, pj.VeraConfig(**{"r": 4, "target_modules": ["fc1"], **kw}), key=RBG, name="b")


def test_later_adapter_larger_than_the_first_names_the_module():
    p = make_mlp()["params"]
    q = pj.inject(p, pj.VeraConfig(r=4, target_modules=["fc1"]), key=RBG)  # (12, 20)
    with pytest.raises(pj.ShapeError, match=r"module `fc2`.*\(20, 12\).*\(12, 20\)"):
        pj.inject(q, pj.VeraConfig(r=4, target_modules=["fc2"]), key=RBG, name="b")


# ------------------------------------------------------------------------------ bad input


def test_file_projection_smaller_than_a_target_needs(tmp_path):
    d = copy_case("vera_mlp", tmp_path)
    rewrite_weights(
        d, lambda t: t.update({"base_model.vera_A": t["base_model.vera_A"][:, :12].copy()})
    )
    with pytest.raises(
        pj.ShapeError, match=r"module `fc1`.*base_model\.vera_A.*\[4, 12\].*\[4, 20\]"
    ):
        pio.load_pretrained(base_params("vera_mlp"), d)


def test_file_missing_projections_with_save_projection(tmp_path):
    d = copy_case("vera_mlp", tmp_path)
    rewrite_weights(d, lambda t: [t.pop(k) for k in ("base_model.vera_A", "base_model.vera_B")])
    with pytest.raises(pj.FormatError, match=r"lacks.*base_model\.vera_A"):
        pio.load_pretrained(base_params("vera_mlp"), d)
    # strict=False: regenerated from the key (PEFT's values)
    q = pio.load_pretrained(base_params("vera_mlp"), d, strict=False)
    np.testing.assert_array_equal(
        np.asarray(holder_arrays(q)["vera_A"]).T, io_data("vera_mlp")["vera_A"]
    )


@pytest.mark.parametrize(
    "tree,target,kind", [("conv", "conv1", "conv"), ("llama", "embed_tokens", "embed")]
)
def test_only_dense_weights(tree, target, kind):
    p = make_conv() if tree == "conv" else make_llama()
    with pytest.raises(pj.UnsupportedModuleError, match=rf"module `.*{target}`.*{kind}"):
        pj.inject(p, pj.VeraConfig(r=2, target_modules=[target]), key=RBG)
    with pytest.raises(pj.UnsupportedModuleError, match="dense"):
        VeraSpec(
            layout=pj.Layout(kind),
            shape=(3, 3, 4, 8) if kind == "conv" else (32, 16),
            scaling=(1.0,),
            r=2,
            proj_in=100,
            proj_out=100,
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"r": 0}, "`r`"),
        ({"projection_prng_key": -1}, "projection_prng_key"),
        ({"projection_prng_key": 2**32}, "projection_prng_key"),
        ({"projection_prng_key": True}, "projection_prng_key"),
        ({"save_projection": 1}, "save_projection"),
        ({"vera_dropout": 1.0}, "vera_dropout"),
        ({"d_initial": float("nan")}, "d_initial"),
        ({"bias": "all"}, "bias.*not supported"),
        ({"bias": "lora_only"}, "bias"),
        ({"exclude_modules": ["fc1"]}, "exclude_modules"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(pj.ConfigError, match=match):
        pj.VeraConfig(**{"target_modules": ["fc1"], **kw})


def test_config_as_peft():
    c = pj.VeraConfig(target_modules=["q"])
    assert (c.r, c.projection_prng_key, c.save_projection, c.vera_dropout, c.d_initial) == (
        256,
        0,
        True,
        0.0,
        0.1,
    )
    assert (c.fan_in_fan_out, c.bias, c.init_weights) == (False, "none", True)
    for case in CASES:
        d = json.loads((FIX / case / pio.CONFIG_NAME).read_text())
        cfg = pj.VeraConfig.from_dict(d)
        assert pj.config_from_dict(d) == cfg
        out = cfg.to_dict()
        assert set(out) == set(d)
        assert {k: v for k, v in out.items() if k not in ("target_modules", "auto_mapping")} == {
            k: v for k, v in d.items() if k not in ("target_modules", "auto_mapping")
        }
        assert pj.VeraConfig.from_dict(out) == cfg
