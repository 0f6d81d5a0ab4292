"""peftjax's merged weights and initialisations against HF PEFT's math.

Three sources of truth: the float64 NumPy references in ``tests/reference.py`` (themselves
checked against real PEFT in ``test_reference.py``), the real PEFT fixtures in
``tests/fixtures/peft/`` (base weights, adapter files and PEFT's own ``merge_and_unload``
output), and PEFT's init rules (``PEFT_REFERENCE.md``).

Storage conventions (method module docstrings): every array is in Flax orientation, i.e. each
2-D PEFT tensor is stored transposed (LoHa ``hada_w1_a (r, out)`` is PEFT's ``[out, r]``), a
LoRA conv ``lora_A`` is a Flax conv kernel ``(kh, kw, in, r)``, a LoKr conv ``lokr_w2`` is
``(kh, kw, d, b)``, IA3's ``ia3_l`` is 1-D. The reference functions take PEFT's layout, so the
tests transpose when calling them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from tests import reference as ref
from tests.conftest import (
    DENSE_GENERAL_LAYOUTS,
    STACKED_LAYOUT,
    assert_trees_equal,
    make_conv,
    make_dense_general,
    make_llama,
    make_mlp,
    make_stacked,
    randomize,
    weight_nodes,
)

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
# RBG keys: their random-bits programs compile several times faster than threefry's (one
# compilation per adapter shape). The init rules do not depend on the key's implementation;
# `test_init_lora_kaiming_uniform_and_zero_b` also runs with the default (threefry) key.
KEY = INIT_KEY = jax.random.key(0, impl="unsafe_rbg")
RTOL, ATOL = 2e-5, 2e-5


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def get(tree, path: str):
    for k in path.split("."):
        tree = tree[k]
    return tree


def adapted(tree, config, layouts=None, seed=0):
    """Inject, then give every adapter array random values. Returns ``(q, {module: node})``."""
    q = randomize(pj.inject(tree, config, key=KEY, layouts=layouts), seed=seed)
    return q, weight_nodes(q)


def arrays64(node, name="default") -> dict[str, np.ndarray]:
    return {k: f64(v) for k, v in node.arrays[name].items()}


def scale(node, name="default") -> float:
    (s,) = set(node.spec(name).scaling)
    return s


# ------------------------------------------------------------------------------ LoRA / DoRA


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_dense(rslora):
    p = make_mlp()
    cfg = pj.LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, target_modules=["fc1", "fc2"])
    q, mods = adapted(p, cfg)
    merged = pj.merge_and_unload(q)
    for mod, node in mods.items():
        a = arrays64(node)
        assert a["lora_A"].shape == (node.shape[0], 4) and a["lora_B"].shape == (4, node.shape[1])
        s = ref.lora_scaling(4, 6, rslora)
        assert scale(node) == pytest.approx(s)
        want = f64(p["params"][mod]["kernel"]) + ref.lora_delta(a["lora_A"], a["lora_B"], s)
        np.testing.assert_allclose(merged["params"][mod]["kernel"], want, rtol=RTOL, atol=ATOL)
        # biases are not touched by LoRA
        np.testing.assert_array_equal(merged["params"][mod]["bias"], p["params"][mod]["bias"])


def test_lora_dense_general():
    p = make_dense_general()
    q, mods = adapted(
        p, pj.LoraConfig(r=3, lora_alpha=6, target_modules=["query", "out"]), DENSE_GENERAL_LAYOUTS
    )
    merged = pj.merge_and_unload(q)
    for mod, shape2 in (("attn.query", (16, 8)), ("attn.out", (8, 16))):
        a = arrays64(mods[mod])
        assert a["lora_A"].shape == (shape2[0], 3) and a["lora_B"].shape == (3, shape2[1])
        w = f64(get(p["params"], mod)["kernel"])
        want = w.reshape(shape2) + ref.lora_delta(a["lora_A"], a["lora_B"], 2.0)
        got = get(merged["params"], mod)["kernel"]
        np.testing.assert_allclose(got, want.reshape(w.shape), rtol=RTOL, atol=ATOL)


def test_lora_conv():
    p = make_conv()
    q, mods = adapted(p, pj.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2"]))
    merged = pj.merge_and_unload(q)
    for mod in ("conv1", "conv2"):
        a = arrays64(mods[mod])
        kh, kw, cin, cout = p["params"][mod]["kernel"].shape
        assert a["lora_A"].shape == (kh, kw, cin, 2) and a["lora_B"].shape == (2, cout)
        want = f64(p["params"][mod]["kernel"]) + ref.lora_conv_delta(a["lora_A"], a["lora_B"], 2.0)
        np.testing.assert_allclose(merged["params"][mod]["kernel"], want, rtol=RTOL, atol=ATOL)


def test_lora_embedding():
    p = make_llama()
    q, mods = adapted(p, pj.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    a = arrays64(mods["model.embed_tokens"])
    assert a["lora_A"].shape == (32, 4) and a["lora_B"].shape == (4, 16)
    merged = pj.merge_and_unload(q)
    want = f64(p["params"]["model"]["embed_tokens"]["embedding"]) + ref.lora_embed_delta(
        a["lora_A"], a["lora_B"], 2.0
    )
    got = merged["params"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_lora_stacked_per_layer():
    p = make_stacked()
    cfg = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=[1])
    q, mods = adapted(p, cfg, STACKED_LAYOUT)
    node = mods["layers.mlp.down_proj"]
    assert node.spec("default").scaling == (0.0, 2.0, 0.0)
    a = arrays64(node)
    # only the transformed layer is stored (compact): one slice, layer 1
    assert node.spec("default").layers == (1,)
    assert a["lora_A"].shape == (1, 24, 2) and a["lora_B"].shape == (1, 2, 16)
    got = np.asarray(pj.merge_and_unload(q)["params"]["layers"]["mlp"]["down_proj"]["kernel"])
    w = f64(p["params"]["layers"]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_array_equal(got[0], w[0])
    np.testing.assert_array_equal(got[2], w[2])
    want = w[1] + ref.lora_delta(a["lora_A"][0], a["lora_B"][0], 2.0)
    np.testing.assert_allclose(got[1], want, rtol=RTOL, atol=ATOL)


def test_dora_dense():
    p = make_mlp()
    q0 = pj.inject(
        p, pj.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["fc1"]), key=KEY
    )
    # init: m = column norms of W (B = 0)
    m0 = f64(weight_nodes(q0)["fc1"].arrays["default"]["lora_magnitude_vector"])
    w = f64(p["params"]["fc1"]["kernel"])
    np.testing.assert_allclose(m0, np.linalg.norm(w, axis=0), rtol=1e-6)
    q = randomize(q0, seed=1)
    a = arrays64(weight_nodes(q)["fc1"])
    want = ref.dora_merge(w, a["lora_A"], a["lora_B"], 2.0, a["lora_magnitude_vector"])
    got = pj.merge_and_unload(q)["params"]["fc1"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(
        pj.merge_and_unload(q)["params"]["fc1"]["bias"], p["params"]["fc1"]["bias"]
    )


def test_dora_conv_and_embedding():
    # PEFT: conv norm over (in, kh, kw) per output channel; embedding (fan_in_fan_out) norm over
    # the vocabulary per feature. Both are column norms of peftjax's (in, out) matrix view.
    p = make_conv()
    q, mods = adapted(p, pj.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["conv1"]))
    a = arrays64(mods["conv1"])
    v = f64(p["params"]["conv1"]["kernel"]) + ref.lora_conv_delta(a["lora_A"], a["lora_B"], 2.0)
    norm = np.sqrt((v**2).sum(axis=(0, 1, 2)))
    want = v * (a["lora_magnitude_vector"] / norm)
    got = pj.merge_and_unload(q)["params"]["conv1"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    p = make_llama()
    q, mods = adapted(
        p, pj.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["embed_tokens"])
    )
    a = arrays64(mods["model.embed_tokens"])
    v = f64(p["params"]["model"]["embed_tokens"]["embedding"]) + ref.lora_embed_delta(
        a["lora_A"], a["lora_B"], 2.0
    )
    want = v * (a["lora_magnitude_vector"] / np.linalg.norm(v, axis=0))[None, :]
    got = pj.merge_and_unload(q)["params"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ LoHa


def test_loha_dense():
    p = make_mlp()
    q, mods = adapted(p, pj.LoHaConfig(r=3, alpha=6, target_modules=["fc1", "fc2"]))
    merged = pj.merge_and_unload(q)
    for mod, node in mods.items():
        a = arrays64(node)
        n_in, n_out = node.shape
        assert a["hada_w1_a"].shape == (3, n_out) and a["hada_w1_b"].shape == (n_in, 3)
        # stored transposed: PEFT's hada_w1_a [out, r] is a["hada_w1_a"].T ...
        d = ref.loha_delta(
            a["hada_w1_a"].T, a["hada_w1_b"].T, a["hada_w2_a"].T, a["hada_w2_b"].T, 2.0
        )
        want = f64(p["params"][mod]["kernel"]) + d
        np.testing.assert_allclose(merged["params"][mod]["kernel"], want, rtol=RTOL, atol=ATOL)


def test_loha_conv():
    p = make_conv()
    q, mods = adapted(p, pj.LoHaConfig(r=2, alpha=4, target_modules=["conv1"]))
    a = arrays64(mods["conv1"])
    assert a["hada_w1_b"].shape == (4 * 3 * 3, 2) and a["hada_w1_a"].shape == (2, 8)
    d = ref.loha_conv_delta(
        a["hada_w1_a"].T, a["hada_w1_b"].T, a["hada_w2_a"].T, a["hada_w2_b"].T, 2.0, (3, 3)
    )
    want = f64(p["params"]["conv1"]["kernel"]) + d
    got = pj.merge_and_unload(q)["params"]["conv1"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ LoKr


def _lokr_peft_factors(a: dict, conv_k: tuple[int, int] | None = None):
    """PEFT-layout ``(w1 [a, c], w2 [b, d] or [b, d*kh*kw] / [b, d, kh, kw])`` from peftjax's."""
    if "lokr_w1" in a:
        w1 = ref.lokr_w1(w1=a["lokr_w1"].T)
    else:
        w1 = ref.lokr_w1(w1_a=a["lokr_w1_a"].T, w1_b=a["lokr_w1_b"].T)
    if "lokr_w2" in a:
        w2 = a["lokr_w2"].transpose(3, 2, 0, 1) if conv_k else a["lokr_w2"].T
    else:
        w2 = ref.lokr_w2(w2_a=a["lokr_w2_a"].T, w2_b=a["lokr_w2_b"].T)
    return w1, w2


LOKR_DENSE = {
    # fc1: 12 -> 20: in (3, 4), out (4, 5); fc2: 20 -> 12
    "full": (pj.LoKrConfig(r=8, alpha=4, target_modules=["fc1", "fc2"]), {"lokr_w1", "lokr_w2"}),
    "decomposed": (
        pj.LoKrConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]),
        {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
    ),
    "decompose_both": (
        pj.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=["fc1", "fc2"]),
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    ),
    "factor": (
        pj.LoKrConfig(
            r=1, alpha=2, decompose_both=True, decompose_factor=2, target_modules=["fc1", "fc2"]
        ),
        {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
    ),
}


@pytest.mark.parametrize("case", list(LOKR_DENSE))
def test_lokr_dense(case):
    cfg, names = LOKR_DENSE[case]
    p = make_mlp()
    q, mods = adapted(p, cfg)
    merged = pj.merge_and_unload(q)
    for mod, node in mods.items():
        a = arrays64(node)
        assert set(a) == names
        n_in, n_out = node.shape
        shapes = ref.lokr_shapes(n_in, n_out, cfg.r, cfg.decompose_both, cfg.decompose_factor)
        w1, w2 = _lokr_peft_factors(a)
        assert w1.shape == (shapes["a"], shapes["c"]) and w2.shape == (shapes["b"], shapes["d"])
        want = f64(p["params"][mod]["kernel"]) + ref.lokr_delta(w1, w2, cfg.alpha / cfg.r)
        np.testing.assert_allclose(merged["params"][mod]["kernel"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "r,names", [(8, {"lokr_w1", "lokr_w2"}), (1, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"})]
)
def test_lokr_conv(r, names):
    p = make_conv()  # conv1 (3, 3, 4, 8): channels in 4 = (2, 2), out 8 = (2, 4)
    q, mods = adapted(p, pj.LoKrConfig(r=r, alpha=2, target_modules=["conv1"]))
    a = arrays64(mods["conv1"])
    assert set(a) == names
    if "lokr_w2" in a:
        assert a["lokr_w2"].shape == (3, 3, 2, 4)
    else:
        assert a["lokr_w2_b"].shape == (2 * 9, r) and a["lokr_w2_a"].shape == (r, 4)
    w1, w2 = _lokr_peft_factors(a, conv_k=(3, 3))
    want = f64(p["params"]["conv1"]["kernel"]) + ref.lokr_conv_delta(w1, w2, 2 / r, (3, 3))
    got = pj.merge_and_unload(q)["params"]["conv1"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ IA3


def test_ia3_dense_bias():
    p = make_mlp()
    q, mods = adapted(p, pj.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    merged = pj.merge_and_unload(q)
    l1 = arrays64(mods["fc1"])["ia3_l"]
    l2 = arrays64(mods["fc2"])["ia3_l"]
    assert l1.shape == (20,) and l2.shape == (20,)  # fc1 output units, fc2 input units
    mp = merged["params"]
    w1, w2 = f64(p["params"]["fc1"]["kernel"]), f64(p["params"]["fc2"]["kernel"])
    np.testing.assert_allclose(mp["fc1"]["kernel"], ref.ia3_merge(w1, l1, False), rtol=RTOL)
    np.testing.assert_allclose(mp["fc2"]["kernel"], ref.ia3_merge(w2, l2, True), rtol=RTOL)
    np.testing.assert_allclose(
        mp["fc1"]["bias"],
        ref.ia3_merge_bias(f64(p["params"]["fc1"]["bias"]), l1, False),
        rtol=RTOL,
    )
    np.testing.assert_array_equal(mp["fc2"]["bias"], p["params"]["fc2"]["bias"])  # ff: unscaled


def test_ia3_conv_dense_general_stacked_bias():
    p = make_conv()
    q, mods = adapted(
        p, pj.IA3Config(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"])
    )
    mp = pj.merge_and_unload(q)["params"]
    l1, l2 = arrays64(mods["conv1"])["ia3_l"], arrays64(mods["conv2"])["ia3_l"]
    assert l1.shape == (8,) and l2.shape == (8,)  # conv1 out channels, conv2 in channels
    np.testing.assert_allclose(
        mp["conv1"]["kernel"], f64(p["params"]["conv1"]["kernel"]) * l1, rtol=RTOL
    )
    np.testing.assert_allclose(
        mp["conv1"]["bias"], f64(p["params"]["conv1"]["bias"]) * l1, rtol=RTOL
    )
    np.testing.assert_allclose(
        mp["conv2"]["kernel"], f64(p["params"]["conv2"]["kernel"]) * l2[:, None], rtol=RTOL
    )
    np.testing.assert_array_equal(mp["conv2"]["bias"], p["params"]["conv2"]["bias"])

    # DenseGeneral: a (2, 4) bias of a (16, 2, 4) kernel is scaled with the 8 outputs
    p = make_dense_general()
    q, mods = adapted(p, pj.IA3Config(target_modules=["query"]), DENSE_GENERAL_LAYOUTS)
    l = arrays64(mods["attn.query"])["ia3_l"]
    assert l.shape == (8,)
    mp = pj.merge_and_unload(q)["params"]["attn"]["query"]
    src = p["params"]["attn"]["query"]
    np.testing.assert_allclose(mp["kernel"], f64(src["kernel"]) * l.reshape(2, 4), rtol=RTOL)
    np.testing.assert_allclose(mp["bias"], f64(src["bias"]) * l.reshape(2, 4), rtol=RTOL)

    # stacked: a (3, 16) bias, one vector per layer
    p = make_stacked()
    q, mods = adapted(p, pj.IA3Config(target_modules=["q_proj"]), STACKED_LAYOUT)
    l = arrays64(mods["layers.self_attn.q_proj"])["ia3_l"]
    assert l.shape == (3, 16)
    mp = pj.merge_and_unload(q)["params"]["layers"]["self_attn"]["q_proj"]
    src = p["params"]["layers"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(mp["kernel"], f64(src["kernel"]) * l[:, None, :], rtol=RTOL)
    np.testing.assert_allclose(mp["bias"], f64(src["bias"]) * l, rtol=RTOL)


#: IA3 vectors where PEFT's ``+ 1e-8`` in unmerge shows: 0 (``0 / (0 + 1e-8)``), values of the
#: order of the eps (``l / (l + 1e-8)`` is far from 1), and ordinary ones
IA3_SMALL = np.array([0.0, 1e-8, 2e-8, 5e-9, 1e-7, 3e-9, 0.0, 1e-8, 1e-6, 1.0] * 2, np.float32)


def _peft_ia3_unmerge(w32: np.ndarray, l32: np.ndarray) -> np.ndarray:
    """PEFT's ``torch.div(weight, ia3_l + 1e-8)``, in float32 as PEFT runs it."""
    return w32 / (l32 + np.float32(1e-8))


def test_ia3_unmerge_divides_with_eps():
    """PEFT's unmerge divides by ``l + 1e-8`` (weight and bias, output and feedforward IA3): with
    ``l`` of the order of the eps, or 0, the eps decides the result (an eps of 0 gives NaN or
    ``W`` instead of ``W / 2``, an eps of 1e-6 about ``W / 100``)."""
    p = make_mlp()
    cfg = pj.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    q = pj.inject(p, cfg, key=KEY)
    l = jnp.asarray(IA3_SMALL)  # fc1: 20 outputs; fc2 (feedforward): 20 inputs

    def set_l(x):
        if isinstance(x, pj.Adapted) and x.arrays["default"]:
            return x.replace(arrays={"default": {"ia3_l": l}})
        return x

    q = jax.tree_util.tree_map(set_l, q, is_leaf=lambda x: isinstance(x, pj.Adapted))
    m = pj.merge(q)
    back = pj.unmerge(m)
    w1, b1 = (np.asarray(p["params"]["fc1"][k]) for k in ("kernel", "bias"))
    w2 = np.asarray(p["params"]["fc2"]["kernel"])
    l32 = IA3_SMALL
    mp = lambda t, mod, k: np.asarray(get(t["params"], mod)[k].base)  # noqa: E731
    np.testing.assert_array_equal(mp(m, "fc1", "kernel"), w1 * l32)
    want = {
        ("fc1", "kernel"): _peft_ia3_unmerge(w1 * l32, l32),
        ("fc1", "bias"): _peft_ia3_unmerge(b1 * l32, l32),
        ("fc2", "kernel"): _peft_ia3_unmerge(w2 * l32[:, None], l32[:, None]),
    }
    for (mod, k), w in want.items():
        got = mp(back, mod, k)
        assert np.isfinite(got).all(), (mod, k)
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=0, err_msg=f"{mod}.{k}")
    # where l = 1e-8 the round trip gives half the weight, not the weight: the eps is there
    half = IA3_SMALL == np.float32(1e-8)
    np.testing.assert_allclose(mp(back, "fc1", "kernel")[:, half], w1[:, half] / 2, rtol=1e-6)
    # and PEFT's 1 / (0 + 1e-8): a merged weight whose vector is 0 is divided by the eps alone
    bigger = jax.tree_util.tree_map(
        lambda x: x.replace(base=x.base + 1.0) if isinstance(x, pj.Adapted) else x,
        m,
        is_leaf=lambda x: isinstance(x, pj.Adapted),
    )
    got = mp(pj.unmerge(bigger), "fc1", "kernel")
    np.testing.assert_allclose(got, _peft_ia3_unmerge(w1 * l32 + 1.0, l32), rtol=1e-6, atol=0)
    assert np.abs(got[:, IA3_SMALL == 0]).min() > 1e7


# ------------------------------------------------------------------------------ inits


def _big_dense(n_in=256, n_out=64):
    return {"big": {"kernel": jnp.zeros((n_in, n_out))}}


@pytest.mark.parametrize("key", [INIT_KEY, jax.random.key(0)], ids=["rbg", "threefry"])
def test_init_lora_kaiming_uniform_and_zero_b(key):
    q = pj.inject(_big_dense(), pj.LoraConfig(r=16, target_modules=["big"]), key=key)
    a = f64(q["big"]["kernel"].arrays["default"]["lora_A"])
    b = f64(q["big"]["kernel"].arrays["default"]["lora_B"])
    bound = ref.kaiming_uniform_bound(256)
    assert a.shape == (256, 16)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b / sqrt(3)
    assert abs(a.mean()) < 0.05 * bound
    assert not b.any()
    # conv: fan_in = in_channels * kh * kw
    cq = pj.inject(
        {"c": {"kernel": jnp.zeros((3, 3, 16, 8))}},
        pj.LoraConfig(r=8, target_modules=["c"]),
        key=INIT_KEY,
    )
    ca = f64(cq["c"]["kernel"].arrays["default"]["lora_A"])
    cb = ref.kaiming_uniform_bound(16 * 9)
    assert ca.shape == (3, 3, 16, 8)
    assert np.abs(ca).max() <= cb and np.abs(ca).max() > 0.5 * cb
    assert not f64(cq["c"]["kernel"].arrays["default"]["lora_B"]).any()
    # different modules get different draws
    q2 = pj.inject(
        {"x": _big_dense(), "y": _big_dense()},
        pj.LoraConfig(r=16, target_modules=["big"]),
        key=INIT_KEY,
    )
    ax = f64(q2["x"]["big"]["kernel"].arrays["default"]["lora_A"])
    ay = f64(q2["y"]["big"]["kernel"].arrays["default"]["lora_A"])
    assert not np.array_equal(ax, ay)


def test_init_lora_gaussian_false_and_embedding():
    q = pj.inject(
        _big_dense(),
        pj.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["big"]),
        key=INIT_KEY,
    )
    a = f64(q["big"]["kernel"].arrays["default"]["lora_A"])
    assert abs(a.std() - 1 / 4) < 0.1 / 4
    assert not f64(q["big"]["kernel"].arrays["default"]["lora_B"]).any()
    # init_lora_weights=False: torch's default init for both, B ~ U(+-1/sqrt(r))
    q = pj.inject(
        _big_dense(),
        pj.LoraConfig(r=16, init_lora_weights=False, target_modules=["big"]),
        key=INIT_KEY,
    )
    b = f64(q["big"]["kernel"].arrays["default"]["lora_B"])
    assert b.shape == (16, 64)
    assert np.abs(b).max() <= 1 / 4 and np.abs(b).max() > 0.5 / 4
    # embedding: reversed, A = 0, B ~ N(0, 1)
    e = pj.inject(
        {"emb": {"embedding": jnp.zeros((512, 32))}},
        pj.LoraConfig(r=16, target_modules=["emb"]),
        key=INIT_KEY,
    )
    ea = f64(e["emb"]["embedding"].arrays["default"]["lora_A"])
    eb = f64(e["emb"]["embedding"].arrays["default"]["lora_B"])
    assert ea.shape == (512, 16) and not ea.any()
    assert eb.shape == (16, 32) and abs(eb.std() - 1.0) < 0.1 and abs(eb.mean()) < 0.1


def test_init_loha():
    q = pj.inject(_big_dense(), pj.LoHaConfig(r=16, target_modules=["big"]), key=INIT_KEY)
    a = arrays64(q["big"]["kernel"])
    assert not a["hada_w2_b"].any()
    # stored transposed: hada_w1_a (r, out) is PEFT's [out, r] (fan_in r); w1_b (in, r) is
    # PEFT's [r, in] (fan_in in)
    for k, fan_in in (("hada_w1_a", 16), ("hada_w1_b", 256), ("hada_w2_a", 16)):
        bound = ref.kaiming_uniform_bound(fan_in)
        assert np.abs(a[k]).max() <= bound and np.abs(a[k]).max() > 0.5 * bound, k
    q = pj.inject(
        _big_dense(), pj.LoHaConfig(r=16, init_weights=False, target_modules=["big"]), key=INIT_KEY
    )
    w2b = arrays64(q["big"]["kernel"])["hada_w2_b"]
    bound = ref.kaiming_uniform_bound(256)
    assert np.abs(w2b).max() <= bound and np.abs(w2b).max() > 0.5 * bound


@pytest.mark.parametrize("init", [True, "lycoris", False])
@pytest.mark.parametrize("decompose_both", [False, True])
def test_init_lokr(init, decompose_both):
    # 256 -> 64: in (16, 16), out (8, 8); r=2 decomposes w2 (and w1 with decompose_both)
    cfg = pj.LoKrConfig(
        r=2, init_weights=init, decompose_both=decompose_both, target_modules=["big"]
    )
    a = arrays64(pj.inject(_big_dense(), cfg, key=INIT_KEY)["big"]["kernel"])
    w1 = "lokr_w1_a" if decompose_both else "lokr_w1"
    assert set(a) == ({"lokr_w1_a", "lokr_w1_b"} if decompose_both else {"lokr_w1"}) | {
        "lokr_w2_a",
        "lokr_w2_b",
    }
    zero = {True: {w1}, "lycoris": {"lokr_w2_b"}, False: set()}[init]
    fan_in = {"lokr_w1": 16, "lokr_w1_a": 2, "lokr_w1_b": 16, "lokr_w2_a": 2, "lokr_w2_b": 16}
    for k, v in a.items():
        if k in zero:
            assert not v.any(), k
        else:
            bound = ref.kaiming_uniform_bound(fan_in[k])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.3 * bound, k


def test_init_ia3():
    q = pj.inject(
        make_mlp(),
        pj.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
        key=INIT_KEY,
    )
    for node in weight_nodes(q).values():
        np.testing.assert_array_equal(node.arrays["default"]["ia3_l"], 1.0)
    q = pj.inject(
        make_mlp(), pj.IA3Config(target_modules=["fc1"], init_ia3_weights=False), key=INIT_KEY
    )
    assert not np.all(f64(weight_nodes(q)["fc1"].arrays["default"]["ia3_l"]) == 1.0)


# ------------------------------------------------------------------------------ factorization


def test_factorization_matches_peft():
    data = json.loads((FIX / "factorization.json").read_text())
    cols = data["columns"]
    assert cols[:2] == ["dimension", "factor"]
    for dim, factor, m, n in data["cases"]:
        assert pj.factorization(dim, factor) == (m, n), (dim, factor)


# ------------------------------------------------------------------------------ real PEFT files


def _to_flax(w: np.ndarray) -> np.ndarray:
    """A torch weight to Flax layout: Linear (out, in) -> (in, out); Conv -> (kh, kw, in, out)."""
    if w.ndim == 4:
        return ref.torch_to_flax_conv(w)
    if w.ndim == 2:
        return ref.torch_to_flax_linear(w)
    return w


def _flax_params(base: dict[str, np.ndarray]) -> dict:
    """``{"fc1.weight": W, "fc1.bias": b}`` -> ``{"fc1": {"kernel": W.T, "bias": b}}``."""
    tree: dict = {}
    for key, w in base.items():
        mod, leaf = key.rsplit(".", 1)
        if leaf == "weight":
            name, value = ("embedding", w) if "emb" in mod else ("kernel", _to_flax(w))
        else:
            name, value = leaf, w
        tree.setdefault(mod, {})[name] = jnp.asarray(value)
    return tree


def _adapter_array(param: str, t: np.ndarray) -> np.ndarray:
    """A PEFT adapter tensor to peftjax's storage layout."""
    if param == "ia3_l" or t.ndim == 1:
        return t.reshape(-1)
    if param == "lora_B" and t.ndim == 4:  # conv lora_B [out, r, 1, 1] -> (r, out)
        return t[:, :, 0, 0].T
    if t.ndim == 4:  # lora_A [r, in, kh, kw], lokr_w2 [b, d, kh, kw] -> (kh, kw, in, r) ...
        return t.transpose(2, 3, 1, 0)
    return t.T


PEFT_CASES = [
    "lora_linear",
    "lora_rslora_patterns",
    "dora_linear",
    "loha_linear",
    "lokr_linear_full",
    "lokr_linear_decomposed",
    "lokr_linear_decompose_both",
    "ia3_mlp",
    "lora_conv2d",
    "lora_embedding",
    "loha_conv2d",
    "lokr_conv2d",
    "lokr_conv2d_full",
    "loha_conv2d_effective",  # hada_t1/t2 (kh, kw, r, r) = PEFT [r, r, kh, kw] as a conv kernel
    "lokr_conv2d_effective",
]


@pytest.mark.parametrize("case", PEFT_CASES)
def test_merged_matches_real_peft(case):
    d = FIX / case
    config = pj.config_from_dict(json.loads((d / "adapter_config.json").read_text()))
    base = load_file(d / "base.safetensors")
    adapter = load_file(d / "adapter_model.safetensors")
    io = load_file(d / "io.safetensors")
    params = _flax_params(base)
    q = pj.inject(params, config, key=KEY)
    # overwrite every adapter array with PEFT's tensor
    by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, t in adapter.items():
        path = key.removeprefix("base_model.model.").removesuffix(".weight")
        mod, param = path.rsplit(".", 1)
        if param.startswith("lora_embedding_"):
            param = param.replace("embedding_", "")
        by_module.setdefault(mod, {})[param] = _adapter_array(param, t)
    mods = weight_nodes(q)
    assert sorted(mods) == sorted(by_module)

    def fill(x):
        if not isinstance(x, pj.Adapted) or not x.arrays["default"]:
            return x
        (mod,) = [m for m, n in mods.items() if n is x]
        cur = x.arrays["default"]
        new = by_module[mod]
        assert set(new) == set(cur), (mod, set(new), set(cur))
        for k in cur:
            assert new[k].shape == cur[k].shape, (mod, k, new[k].shape, cur[k].shape)
        return x.replace(arrays={"default": {k: jnp.asarray(v) for k, v in new.items()}})

    q = jax.tree_util.tree_map(fill, q, is_leaf=lambda x: isinstance(x, pj.Adapted))
    merged = pj.merge_and_unload(q)
    want = _flax_params({k[len("merged.") :]: v for k, v in io.items() if k.startswith("merged.")})
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(want)
    for (path, got), exp in zip(
        jax.tree_util.tree_flatten_with_path(merged)[0],
        jax.tree_util.tree_leaves(want),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(got),
            np.asarray(exp),
            rtol=1e-5,
            atol=2e-5,
            err_msg=jax.tree_util.keystr(path),
        )
    # and the unmerge gets PEFT's base weights back
    back = pj.unload(pj.unmerge(pj.merge(q)))
    for got, exp in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=5e-5)


def test_zero_init_matches_base_exactly():
    # sanity for the helper above: the PEFT base tree round-trips through inject/unload
    params = _flax_params(load_file(FIX / "lora_linear" / "base.safetensors"))
    q = pj.inject(params, pj.LoraConfig(r=4, target_modules=["fc1", "fc2"]), key=KEY)
    assert_trees_equal(pj.unload(q), params)
    assert_trees_equal(pj.merge_and_unload(q), params)


def test_dora_forward_norm_is_the_norm_of_w_plus_delta():
    """DoRA's forward takes ``||W + s A B||`` per output column without building the sum; it
    equals the direct norm (float64 numpy reference) to float32 precision."""
    from peftjax.methods.lora import _factored_col_norm

    rng = np.random.default_rng(7)
    for i, o, r, s in [(24, 40, 4, 2.0), (64, 16, 8, 0.5), (8, 8, 2, 0.0)]:
        w = rng.normal(0, 0.2, (i, o)).astype(np.float32)
        a = rng.normal(0, 0.1, (i, r)).astype(np.float32)
        b = rng.normal(0, 0.1, (r, o)).astype(np.float32)
        ref = np.linalg.norm(w.astype(np.float64) + s * (a.astype(np.float64) @ b), axis=0)
        got = np.asarray(_factored_col_norm(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), s))
        np.testing.assert_allclose(got, ref, rtol=2e-6)
