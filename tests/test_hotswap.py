"""`pj.prepare_hotswap` / `pj.hotswap` (PEFT's ``prepare_model_for_compiled_hotswap`` and
``hotswap_adapter``): a jitted serving function runs every swapped-in adapter (other ranks,
alphas, rsLoRA, DoRA, fewer modules) exactly as when it is loaded normally, without a retrace or
a recompile; numerics against a numpy reference and HF PEFT's own outputs (fixtures); bad input
raises before anything changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from tests.conftest import STACKED_LAYOUT, assert_unchanged, make_mlp, make_stacked, snapshot

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
TARGETS = ["fc1", "fc2"]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(12, name="fc2")(nn.relu(nn.Dense(20, name="fc1")(x)))


MODEL = MLP()


def perturb(q, seed, names=None):
    """Every trainable array of ``q`` perturbed by N(0, 0.3^2) (numpy: no compiles)."""
    rng = np.random.default_rng(seed)

    def fix(x):
        if not isinstance(x, pj.Adapted):
            return x
        arrays = {}
        for n, a in x.arrays.items():
            if names is not None and n not in names:
                arrays[n] = a
                continue
            arrays[n] = {
                k: jnp.asarray(np.asarray(v) + rng.normal(0, 0.3, v.shape).astype(np.float32))
                for k, v in a.items()
            }
        return x.replace(arrays=arrays)

    return jax.tree_util.tree_map(fix, q, is_leaf=lambda x: isinstance(x, pj.Adapted))


def lora(base, seed, **kw):
    kw.setdefault("target_modules", TARGETS)
    return perturb(pj.inject(base, pj.LoraConfig(**kw), key=seed), seed)


def ref_forward(q, x, name="default"):
    """numpy reference: ``W + s A B`` on each LoRA module (one scale per module)."""
    p = q["params"]
    h = np.asarray(x, np.float64)
    for i, mod in enumerate(("fc1", "fc2")):
        k = p[mod]["kernel"]
        if isinstance(k, pj.Adapted):
            spec, a = k.spec(name), k.arrays[name]
            w = np.asarray(k.base, np.float64) + spec.scaling[0] * (
                np.asarray(a["lora_A"], np.float64) @ np.asarray(a["lora_B"], np.float64)
            )
        else:
            w = np.asarray(k, np.float64)
        h = h @ w + np.asarray(p[mod]["bias"], np.float64)
        if i == 0:
            h = np.maximum(h, 0)
    return h


def leaf_info(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(x.shape, x.dtype, x.sharding, x.committed, x.weak_type) for x in leaves]


@pytest.fixture(scope="module")
def base():
    return make_mlp()


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(9).normal(size=(3, 12)).astype(np.float32))


@pytest.fixture(scope="module")
def adapters(base):
    return {
        "r4": lora(base, 1, r=4, lora_alpha=8),
        "r8": lora(base, 2, r=8, lora_alpha=32),
        "r8_patterns": lora(base, 3, r=8, lora_alpha=4, rank_pattern={"fc2": 2}),
        "rslora": lora(base, 4, r=4, lora_alpha=3, use_rslora=True),
        "fc1_only": lora(base, 5, r=6, lora_alpha=6, target_modules=["fc1"]),
    }


@pytest.fixture(scope="module")
def served(adapters):
    """``(prepared params, f, trace counter)``; ``f`` is compiled once, here."""
    traces = []

    def fn(p, x):
        traces.append(1)
        return MODEL.apply(p, x)

    f = jax.jit(pj.apply(fn))
    prepared = pj.prepare_hotswap(adapters["r4"], target_rank=8)
    return prepared, f, traces


# ------------------------------------------------------------------------------------ serving


def test_prepare_pads_exactly(adapters, served, x):
    prepared, f, _ = served
    k = prepared["params"]["fc1"]["kernel"]
    a, b = k.arrays["default"]["lora_A"], k.arrays["default"]["lora_B"]
    assert a.shape == (12, 8) and b.shape == (8, 20) and k.spec("default").r == 8
    np.testing.assert_array_equal(np.asarray(a[:, 4:]), 0)
    np.testing.assert_array_equal(np.asarray(b[4:]), 0)
    old = adapters["r4"]["params"]["fc1"]["kernel"]
    assert k.spec("default").scaling == old.spec("default").scaling
    np.testing.assert_array_equal(np.asarray(a[:, :4]), np.asarray(old.arrays["default"]["lora_A"]))
    np.testing.assert_allclose(f(prepared, x), ref_forward(adapters["r4"], x), atol=1e-5)


def test_swaps_run_without_recompiling(adapters, served, x):
    prepared, f, traces = served
    f(prepared, x)
    before = leaf_info(prepared)
    n_traces = len(traces)
    p = prepared
    for key in ["r8", "r8_patterns", "rslora", "fc1_only", "r4", "r8"]:
        new = adapters[key]
        p = pj.hotswap(p, new)
        assert leaf_info(p) == before, key
        y = f(p, x)
        want = pj.apply(MODEL.apply)(new, x)
        np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(y, ref_forward(new, x), atol=1e-4, rtol=1e-5, err_msg=key)
    assert len(traces) == n_traces == 1
    assert f._cache_size() == 1


def test_missing_module_is_zeroed(adapters, served, x):
    p = pj.hotswap(served[0], adapters["fc1_only"])
    a = p["params"]["fc2"]["kernel"].arrays["default"]
    np.testing.assert_array_equal(np.asarray(a["lora_A"]), 0)
    np.testing.assert_array_equal(np.asarray(a["lora_B"]), 0)


def test_swap_from_a_peft_directory(adapters, served, x, tmp_path):
    prepared, f, traces = served
    pj.save_pretrained(adapters["rslora"], tmp_path / "rs")
    p = pj.hotswap(prepared, tmp_path / "rs")
    q = pj.hotswap(prepared, adapters["rslora"])
    for u, v in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-7)
    loaded = pj.load_pretrained(pj.unload(prepared), tmp_path / "rs")
    np.testing.assert_allclose(f(p, x), pj.apply(MODEL.apply)(loaded, x), atol=1e-5)
    assert f._cache_size() == 1 and len(traces) == 1


def test_saved_after_swap_loads_back(adapters, served, x, tmp_path):
    """Saved at the prepared rank with the prepared alpha; same outputs when loaded back."""
    p = pj.hotswap(served[0], adapters["r8_patterns"])
    pj.save_pretrained(p, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg.get("rank_pattern")
    back = pj.load_pretrained(pj.unload(p), tmp_path / "s")
    want = pj.apply(MODEL.apply)(adapters["r8_patterns"], x)
    np.testing.assert_allclose(pj.apply(MODEL.apply)(back, x), want, atol=1e-5)


def test_same_rank_swap_needs_no_prepare(adapters, x):
    new = lora(make_mlp(), 7, r=4, lora_alpha=2)
    p = pj.hotswap(adapters["r4"], new)
    assert leaf_info(p) == leaf_info(adapters["r4"])
    np.testing.assert_allclose(pj.apply(MODEL.apply)(p, x), ref_forward(new, x), atol=1e-4)


def test_source_tree_name_and_other_adapters(adapters, base, x):
    two = pj.inject(adapters["r4"], pj.LoraConfig(r=2, target_modules=TARGETS), key=3, name="b")
    src = perturb(pj.inject(base, pj.LoraConfig(r=4, target_modules=TARGETS), key=0, name="x"), 8)
    p = pj.hotswap(two, src)  # its only adapter
    assert pj.adapter_names(p) == ("default", "b")
    assert pj.active(p) == pj.active(two)
    kb = p["params"]["fc1"]["kernel"].arrays["b"]["lora_A"]
    assert kb is two["params"]["fc1"]["kernel"].arrays["b"]["lora_A"]  # other adapter kept
    np.testing.assert_allclose(
        np.asarray(p["params"]["fc1"]["kernel"].arrays["default"]["lora_A"]),
        np.asarray(src["params"]["fc1"]["kernel"].arrays["x"]["lora_A"]),
    )
    src2 = pj.inject(src, pj.LoraConfig(r=4, target_modules=TARGETS), key=1, name="y")
    with pytest.raises(pj.AdapterNameError, match="source_name"):
        pj.hotswap(two, src2)
    pj.hotswap(two, src2, source_name="y")
    with pytest.raises(pj.AdapterNameError, match="'z'"):
        pj.hotswap(two, src2, source_name="z")


# ------------------------------------------------------------------------ real PEFT fixtures


def fixture_base(case):
    sd = load_file(str(FIX / case / "base.safetensors"))
    out: dict = {}
    for k, v in sd.items():
        mod, p = k.split(".")
        out.setdefault(mod, {})["kernel" if p == "weight" else p] = jnp.asarray(
            v.T if v.ndim == 2 else v
        )
    return {"params": out}


def fixture_io(case):
    return load_file(str(FIX / case / "io.safetensors"))


def test_peft_fixtures_swap_into_each_other():
    """lora_linear (r=4, alpha=8) and lora_rslora_patterns (rsLoRA, rank_pattern fc2: 2,
    alpha_pattern fc1: 3) share their base and input; each swapped into the other gives
    PEFT's own output."""
    base = fixture_base("lora_linear")
    other = jax.tree_util.tree_leaves(fixture_base("lora_rslora_patterns"))
    for u, v in zip(jax.tree_util.tree_leaves(base), other, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    f = jax.jit(pj.apply(MODEL.apply))
    p = pj.prepare_hotswap(pj.load_pretrained(base, FIX / "lora_linear"), target_rank=4)
    x = jnp.asarray(fixture_io("lora_linear")["x"])
    np.testing.assert_allclose(f(p, x), fixture_io("lora_linear")["y_adapted"], atol=1e-5)
    for case in ("lora_rslora_patterns", "lora_linear", "lora_rslora_patterns"):
        p = pj.hotswap(p, FIX / case)
        np.testing.assert_allclose(f(p, x), fixture_io(case)["y_adapted"], atol=1e-5, rtol=1e-5)
    assert f._cache_size() == 1


@pytest.fixture(scope="module")
def dora():
    base = fixture_base("dora_linear")
    return base, pj.load_pretrained(base, FIX / "dora_linear")


def test_dora_swaps(dora):
    base, loaded = dora
    io = fixture_io("dora_linear")
    x = jnp.asarray(io["x"])
    f = jax.jit(pj.apply(MODEL.apply))
    p = pj.prepare_hotswap(loaded, target_rank=8)
    np.testing.assert_allclose(f(p, x), io["y_adapted"], atol=1e-5)
    other = perturb(
        pj.inject(
            base, pj.LoraConfig(r=8, lora_alpha=5, use_dora=True, target_modules=TARGETS), key=2
        ),
        4,
    )
    p = pj.hotswap(p, other)
    np.testing.assert_allclose(f(p, x), pj.apply(MODEL.apply)(other, x), atol=1e-5, rtol=1e-5)
    mag = p["params"]["fc1"]["kernel"].arrays["default"]["lora_magnitude_vector"]
    np.testing.assert_array_equal(
        np.asarray(mag),
        np.asarray(other["params"]["fc1"]["kernel"].arrays["default"]["lora_magnitude_vector"]),
    )
    p = pj.hotswap(p, FIX / "dora_linear")
    np.testing.assert_allclose(f(p, x), io["y_adapted"], atol=1e-5)
    # a DoRA module the new adapter leaves out is the base layer (magnitude = ||W||)
    only = perturb(
        pj.inject(base, pj.LoraConfig(r=2, use_dora=True, target_modules=["fc1"]), key=5), 6
    )
    p = pj.hotswap(p, only)
    want = pj.apply(MODEL.apply)(only, x)
    np.testing.assert_allclose(f(p, x), want, atol=1e-5, rtol=1e-5)
    assert f._cache_size() == 1


# --------------------------------------------------------------------- stacked layer slices


def test_stacked_layer_slices():
    base = make_stacked()
    lay = {"q_proj": STACKED_LAYOUT}
    old = perturb(
        pj.inject(base, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=0, layouts=lay), 1
    )
    new = perturb(
        pj.inject(
            base,
            pj.LoraConfig(
                r=4,
                lora_alpha=3,
                target_modules=["q_proj"],
                layers_to_transform=[0, 2],
                layers_pattern="layers",
            ),
            key=1,
            layouts=lay,
        ),
        2,
    )
    p = pj.hotswap(pj.prepare_hotswap(old, target_rank=4), new)
    got = pj.merge_and_unload(p)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    want = pj.merge_and_unload(new)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(got[1]), np.asarray(base["params"]["layers"]["self_attn"]["q_proj"]["kernel"][1])
    )
    swapped = p["params"]["layers"]["self_attn"]["q_proj"]["kernel"].arrays["default"]
    np.testing.assert_array_equal(np.asarray(swapped["lora_A"][1]), 0)  # PEFT zeroes both
    np.testing.assert_array_equal(np.asarray(swapped["lora_B"][1]), 0)
    with pytest.raises(pj.TargetError, match=r"layer slice\(s\) \[1\]"):
        pj.hotswap(pj.prepare_hotswap(new, target_rank=4), old)


# --------------------------------------------------------------------------------- sharding


def test_shardings_are_kept_on_a_mesh(adapters, x):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    base = make_mlp()
    base = jax.tree_util.tree_map(
        lambda v: jax.device_put(v, NamedSharding(mesh, P(None, "x") if v.ndim == 2 else P())),
        base,
    )
    q = pj.inject(base, pj.LoraConfig(r=4, target_modules=TARGETS), key=1)
    p = pj.prepare_hotswap(q, target_rank=8)
    info = leaf_info(p)
    assert any(len(s.device_set) == 2 for _, _, s, _, _ in info[1])
    f = jax.jit(pj.apply(MODEL.apply))
    f(p, x)
    for key in ("r8", "rslora", "fc1_only"):
        s = pj.hotswap(p, adapters[key])
        assert leaf_info(s) == info, key
        np.testing.assert_allclose(f(s, x), ref_forward(adapters[key], x), atol=1e-4)
    assert f._cache_size() == 1


# ------------------------------------------------------------------------------- bad input


def test_purity(adapters, served):
    prepared = served[0]
    before_in, before_new = snapshot(prepared), snapshot(adapters["r8"])
    before_r4 = snapshot(adapters["r4"])
    p = pj.hotswap(prepared, adapters["r8"])
    q = pj.prepare_hotswap(adapters["r4"], target_rank=8)
    assert_unchanged(before_in, prepared)
    assert_unchanged(before_new, adapters["r8"])
    assert_unchanged(before_r4, adapters["r4"])
    for out, src in ((p, prepared), (q, adapters["r4"])):
        a, b = out["params"]["fc1"]["kernel"], src["params"]["fc1"]["kernel"]
        assert a is not b and a.arrays is not b.arrays
        assert a.arrays["default"] is not b.arrays["default"]
        assert out["params"] is not src["params"]


def test_bad_input(adapters, served, base, tmp_path):
    prepared = served[0]
    snap = snapshot(prepared)
    r4, r8 = adapters["r4"], adapters["r8"]
    with pytest.raises(pj.ShapeError, match=r"fc1.*rank 8.*rank 4.*prepare_hotswap.*target_rank"):
        pj.hotswap(r4, r8)
    with pytest.raises(pj.AdapterNameError, match="'nope'"):
        pj.hotswap(prepared, r8, name="nope")
    with pytest.raises(pj.AdapterNameTypeError):
        pj.hotswap(prepared, r8, name=3)
    with pytest.raises(pj.MergeError, match="unmerge"):
        pj.hotswap(pj.merge(r4), r4)
    with pytest.raises(pj.MergeError, match="source"):
        pj.hotswap(r4, pj.merge(r4))
    fc1 = adapters["fc1_only"]
    with pytest.raises(pj.TargetError, match=r"\['fc2'\]"):
        pj.hotswap(pj.prepare_hotswap(fc1, target_rank=8), r8)
    dora = pj.inject(base, pj.LoraConfig(r=4, use_dora=True, target_modules=TARGETS), key=0)
    with pytest.raises(pj.ConfigError, match="fc1.*DoRA.*use_dora"):
        pj.hotswap(dora, r4)
    drop = pj.inject(base, pj.LoraConfig(r=4, lora_dropout=0.1, target_modules=TARGETS), key=0)
    with pytest.raises(pj.ConfigError, match="lora_dropout"):
        pj.hotswap(r4, drop)
    loha = pj.inject(base, pj.LoHaConfig(r=4, target_modules=TARGETS), key=0)
    with pytest.raises(pj.ConfigError, match="LoRA only"):
        pj.hotswap(r4, loha)
    with pytest.raises(pj.ConfigError, match="LoRA only"):
        pj.hotswap(loha, r4)
    with pytest.raises(pj.ConfigError, match="LoRA only"):
        pj.prepare_hotswap(loha, target_rank=8)
    with pytest.raises(pj.ShapeError, match="fc1.*rank 4.*target_rank=2"):
        pj.prepare_hotswap(r4, target_rank=2)
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(pj.ArgumentTypeError, match="target_rank"):
            pj.prepare_hotswap(r4, target_rank=bad)
    with pytest.raises(pj.ArgumentTypeError, match="path_or_params"):
        pj.hotswap(r4, base)
    with pytest.raises(pj.FormatError):
        pj.hotswap(r4, tmp_path / "missing")
    zero = pj.set_scale(prepared, "default", 0.0)
    with pytest.raises(pj.ConfigError, match="scale 0.*set_scale"):
        pj.hotswap(zero, r8)
    assert_unchanged(snap, prepared)


def test_other_methods_swap_only_identical(base):
    cfg = pj.LoHaConfig(r=4, alpha=8, target_modules=TARGETS)
    a = perturb(pj.inject(base, cfg, key=0), 1)
    b = perturb(pj.inject(base, cfg, key=1), 2)
    p = pj.hotswap(a, b)
    for u, v in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    c = pj.inject(base, pj.LoHaConfig(r=4, alpha=4, target_modules=TARGETS), key=1)
    with pytest.raises(pj.ConfigError, match="scaling.*LoRA only"):
        pj.hotswap(a, c)
    d = pj.inject(base, pj.LoHaConfig(r=4, alpha=8, target_modules=["fc1"]), key=1)
    with pytest.raises(pj.TargetError, match="fc2"):
        pj.hotswap(a, d)


@pytest.mark.parametrize("case, module", [("lora_conv2d", "conv"), ("lora_embedding", "emb")])
def test_conv_and_embedding_pad_their_rank_axes(case, module):
    """Conv ``A (kh, kw, in, r)`` / embedding ``A (vocab, r)`` and ``B (r, out)``: padded and
    swapped, the merged weights are the new adapter's."""
    from tests.test_io import flax_from_torch

    base = flax_from_torch(load_file(str(FIX / case / "base.safetensors")))
    loaded = pj.load_pretrained(base, FIX / case)
    p = pj.prepare_hotswap(loaded, target_rank=6)
    new = perturb(
        pj.inject(base, pj.LoraConfig(r=3, lora_alpha=7, target_modules=[module]), key=1), 3
    )
    for src in (new, FIX / case):
        s = pj.hotswap(p, src)
        assert leaf_info(s) == leaf_info(p)
        want = pj.merge_and_unload(new if src is new else loaded)
        got = pj.merge_and_unload(s)
        for u, v in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5, rtol=1e-5)
