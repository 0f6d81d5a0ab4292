"""`pj.add_weighted_adapter` (PEFT's ``LoraModel`` / ``IA3Model.add_weighted_adapter``) against
fixtures made by real HF PEFT 0.21.2 (``tests/fixtures/make_peft_fixtures_arithmetic.py``; no
torch here) and an independent NumPy reference of PEFT's merge rules."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from tests.conftest import assert_unchanged, snapshot
from tests.test_io import flax_from_torch as torch_to_flax

FIX = Path(__file__).resolve().parent / "fixtures" / "peft" / "arithmetic"
META = json.loads((FIX / "lora_results.json").read_text())
LEAF = {"emb": "embedding"}  # every other module's weight is its `kernel`


def flax_from_torch(sd: dict) -> dict:
    """The fixture's torch ``Tiny`` as a Flax tree (Linear ``kernel (in, out)``, Conv2d
    ``kernel (kh, kw, in, out)``, the ``emb`` table as it is)."""
    return torch_to_flax(sd, embeddings={"emb"})


@pytest.fixture(scope="module")
def base():
    return flax_from_torch(load_file(str(FIX / "base.safetensors")))


@pytest.fixture(scope="module")
def lora(base):
    """The base with PEFT's adapters ``x``, ``y``, ``z`` loaded, ``y`` active (as the fixture
    script had it when it combined them)."""
    p = base
    for n in "xyz":
        p = pj.load_pretrained(p, FIX / "lora" / n, name=n)
    return pj.set_active(p, "y")


@pytest.fixture(scope="module")
def peft_results():
    return load_file(str(FIX / "lora_results.safetensors"))


def node(tree, mod):
    return tree[mod][LEAF.get(mod, "kernel")]


def factors_torch(tree, mod, name="mix"):
    """The new adapter's ``(lora_A, lora_B)`` on ``mod`` in PEFT's torch layout."""
    a = np.asarray(node(tree, mod).arrays[name]["lora_A"])
    b = np.asarray(node(tree, mod).arrays[name]["lora_B"])
    if a.ndim == 4:  # conv: A (kh, kw, in, r) -> (r, in, kh, kw); B (r, out) -> (out, r, 1, 1)
        return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    return a.T, b.T


def torch_delta(a, b, mod):
    """PEFT's ``get_delta_weight`` of factors in torch layout (scaling 1), as the Flax matrix
    view ``(in, out)`` (an embedding's ``(vocab, features)``)."""
    if a.ndim == 4:
        return (b[:, :, 0, 0] @ a.reshape(a.shape[0], -1)).T
    return (b @ a).T  # an embedding's A is (r, vocab), B (features, r)


def delta(tree, mod, name="mix"):
    n = node(tree, mod)
    spec = n.spec(name)
    return np.asarray(spec.delta_matrix(n.arrays[name], spec.scaling[0]))


def combine(params, case, name="mix", **extra):
    m = META[case]
    kw = {**m["kwargs"], **extra}
    if kw["combination_type"].startswith("dare") and len(m["adapters"]) > 1:
        kw.setdefault("key", jax.random.key(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pj.add_weighted_adapter(params, m["adapters"], m["weights"], name, **kw)
    assert sorted({str(w.message) for w in caught}) == m["warnings"]  # PEFT's warnings, no more
    return out


def peft_modules(results, case):
    return sorted({k.split(".")[1] for k in results if k.startswith(case + ".")})


# ------------------------------------------------------------------------ against real PEFT

CASES = [c for c in sorted(META) if c != "svd_clamp"]  # the clamp: `test_svd_clamp`


@pytest.mark.parametrize("case", CASES)
def test_lora_matches_peft(lora, peft_results, case):
    """Every combination type: the new adapter's modules, ranks, scaling and deltas are PEFT's;
    its factors too (up to each singular vector's sign for the SVD types, where the singular
    values are distinct)."""
    m = META[case]
    q = combine(lora, case)
    mods = peft_modules(peft_results, case)
    assert pj.targeted_modules(q, "mix") == mods
    assert pj.active(q) == tuple(m["active_adapters"]) == ("y",)  # not activated
    assert pj.adapter_names(q) == ("x", "y", "z", "mix")
    svd = m["kwargs"]["combination_type"].endswith("svd") and len(m["adapters"]) > 1
    for mod in mods:
        a_p, b_p = peft_results[f"{case}.{mod}.lora_A"], peft_results[f"{case}.{mod}.lora_B"]
        spec = node(q, mod).spec("mix")
        assert spec.r == a_p.shape[0] and spec.scaling == (m["scaling"][mod],) == (1.0,)
        np.testing.assert_allclose(
            delta(q, mod), torch_delta(a_p, b_p, mod), rtol=1e-5, atol=1e-5, err_msg=mod
        )
        a, b = factors_torch(q, mod)
        if not svd:
            np.testing.assert_allclose(a, a_p, rtol=1e-5, atol=1e-6, err_msg=mod)
            np.testing.assert_allclose(b, b_p, rtol=1e-5, atol=1e-6, err_msg=mod)
            continue
        s = np.linalg.norm(b_p.reshape(b_p.shape[0], -1), axis=0)  # singular values (U S)
        for k in range(len(s)):
            others = np.delete(s, k)
            if s[k] < 1e-4 or (others.size and np.min(np.abs(others - s[k])) < 1e-3):
                continue  # singular vector not unique: only the delta is defined
            ak, apk = a[k].reshape(-1), a_p[k].reshape(-1)
            sign = np.sign(ak @ apk)
            np.testing.assert_allclose(sign * ak, apk, atol=2e-5, err_msg=f"{mod} A[{k}]")
            bk, bpk = b[:, k].reshape(-1), b_p[:, k].reshape(-1)
            np.testing.assert_allclose(sign * bk, bpk, atol=2e-5, err_msg=f"{mod} B[:, {k}]")


def test_svd_clamp(lora, peft_results):
    """``svd_clamp``: PEFT's factors where our singular vectors have torch's signs (the clamp
    quantile depends on them); everywhere, the clamp of our own unclamped factors at the
    quantile of their values (NumPy reference)."""
    clamped, plain = combine(lora, "svd_clamp"), combine(lora, "svd_noclamp")
    clipped, compared = [], []
    for mod in peft_modules(peft_results, "svd_clamp"):
        a0, b0 = factors_torch(plain, mod)
        ap0 = peft_results[f"svd_noclamp.{mod}.lora_A"]
        hi = np.quantile(np.concatenate([b0.reshape(-1), a0.reshape(-1)]), 0.8)
        a, b = factors_torch(clamped, mod)
        np.testing.assert_allclose(a, np.clip(a0, -hi, hi), atol=1e-6)
        np.testing.assert_allclose(b, np.clip(b0, -hi, hi), atol=1e-6)
        assert np.max(np.abs(a)) <= hi + 1e-6
        clipped.append(np.any(np.abs(a0) > hi + 1e-3) or np.any(np.abs(b0) > hi + 1e-3))
        same_signs = np.all(np.sum(a0.reshape(len(a0), -1) * ap0.reshape(len(a0), -1), 1) > 0)
        if same_signs:
            np.testing.assert_allclose(a, peft_results[f"svd_clamp.{mod}.lora_A"], atol=2e-5)
            np.testing.assert_allclose(b, peft_results[f"svd_clamp.{mod}.lora_B"], atol=2e-5)
            compared.append(mod)
    assert any(clipped) and len(compared) >= 2, (clipped, compared)


def test_ia3_matches_peft(base):
    p = base
    for n in "xy":
        p = pj.load_pretrained(p, FIX / "ia3" / n, name=n)
    before = snapshot(p)
    q = pj.add_weighted_adapter(p, ["x", "y"], [0.6, -0.9], "mix")
    assert_unchanged(before, p)
    want = load_file(str(FIX / "ia3_results.safetensors"))
    meta = json.loads((FIX / "ia3_results.json").read_text())
    assert pj.targeted_modules(q, "mix") == meta["target_modules"]
    assert pj.active(q) == tuple(meta["active_adapters"])
    for key, v in want.items():
        mod = key.split(".")[0]
        n = q[mod]["kernel"]
        assert n.spec("mix").feedforward == (mod in meta["feedforward_modules"])
        np.testing.assert_allclose(n.arrays["mix"]["ia3_l"], v.reshape(-1), rtol=1e-6)
    # the output-scaling module's bias follows the new vector when merged (PEFT scales it)
    merged = pj.merge_and_unload(pj.set_active(q, "mix"))
    l = np.asarray(q["q_proj"]["kernel"].arrays["mix"]["ia3_l"])
    np.testing.assert_allclose(
        merged["q_proj"]["bias"], np.asarray(base["q_proj"]["bias"]) * l, rtol=1e-6
    )
    np.testing.assert_allclose(
        merged["fc"]["kernel"],
        np.asarray(base["fc"]["kernel"])
        * np.asarray(q["fc"]["kernel"].arrays["mix"]["ia3_l"])[:, None],
        rtol=1e-6,
    )


# ------------------------------------------------------------------------ NumPy reference


def np_merge(rule, tensors, weights, density=1.0, method="total", masks=None):
    """PEFT's merge_utils rules, in NumPy."""
    ts = [np.asarray(t, np.float64) for t in tensors]
    if rule in ("ties", "magnitude_prune") and density < 1:
        out = []
        for t in ts:
            k = int(density * t.size)
            keep = np.zeros(t.size)
            keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = 1
            out.append(t * keep.reshape(t.shape))
        ts = out
    if masks is not None:
        ts = [t * m / density for t, m in zip(ts, masks)]
    t = np.stack(ts)
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (t.ndim - 1))
    if rule in ("ties", "dare_ties"):
        sign = np.sign(t)
        votes = t.sum(0) if method == "total" else sign.sum(0)
        mask = sign == np.where(votes >= 0, 1, -1)
        return (t * w * mask).sum(0) / np.maximum(mask.sum(0), 1)
    return (t * w).sum(0)


@pytest.fixture(scope="module")
def two():
    """A small plain tree with two equal-rank LoRA adapters of random, nonzero factors."""
    rng = np.random.default_rng(0)
    p = {
        "q": {"kernel": jnp.asarray(rng.normal(size=(10, 12)), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)},
    }
    cfg = pj.LoraConfig(r=3, lora_alpha=5, target_modules=["q", "v"], init_lora_weights=False)
    p = pj.inject(p, cfg, key=jax.random.key(1), name="a")
    cfg = pj.LoraConfig(r=3, lora_alpha=2, target_modules=["q"], init_lora_weights=False)
    return pj.inject(p, cfg, key=jax.random.key(2), name="b")


def factor_ref(tree, names, weights, rule, **kw):
    """``{module: (A, B)}`` of a factor-wise combination, NumPy."""
    out = {}
    for mod in ("q", "v"):
        n = tree[mod]["kernel"]
        here = [(nm, w) for nm, w in zip(names, weights) if nm in n.names]
        ws = [w * n.spec(nm).scaling[0] for nm, w in here]
        wa = [np.sign(x) * np.sqrt(abs(x)) if x else 0.0 for x in ws]
        wb = [np.sqrt(abs(x)) for x in ws]
        a = np_merge(rule, [n.arrays[nm]["lora_A"] for nm, _ in here], wa, **kw)
        b = np_merge(rule, [n.arrays[nm]["lora_B"] for nm, _ in here], wb, **kw)
        out[mod] = (a, b)
    return out


@pytest.mark.parametrize(
    "rule, kw",
    [
        ("linear", {}),
        ("ties", dict(density=0.5)),
        ("ties", dict(density=0.3, majority_sign_method="frequency")),
        ("magnitude_prune", dict(density=0.6)),
    ],
)
def test_factor_rules_match_numpy(two, rule, kw):
    q = pj.add_weighted_adapter(two, ["a", "b"], [0.8, -1.3], "m", combination_type=rule, **kw)
    ref_kw = {("method" if k == "majority_sign_method" else k): v for k, v in kw.items()}
    ref = factor_ref(two, ["a", "b"], [0.8, -1.3], rule, **ref_kw)
    for mod, (a, b) in ref.items():
        n = q[mod]["kernel"]
        np.testing.assert_allclose(n.arrays["m"]["lora_A"], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(n.arrays["m"]["lora_B"], b, rtol=1e-5, atol=1e-6)
        assert n.spec("m").r == 3 and n.spec("m").scaling == (1.0,)


def test_cat_and_svd_match_numpy(two):
    w = [0.8, -1.3]
    cat = pj.add_weighted_adapter(two, ["a", "b"], w, "m", combination_type="cat")
    svd = pj.add_weighted_adapter(two, ["a", "b"], w, "m", svd_rank=2)
    for mod in ("q", "v"):
        n = two[mod]["kernel"]
        full = sum(
            wi * n.spec(nm).scaling[0] * np.asarray(n.arrays[nm]["lora_A"] @ n.arrays[nm]["lora_B"])
            for nm, wi in zip(["a", "b"], w)
            if nm in n.names
        )
        c = cat[mod]["kernel"]
        assert c.spec("m").r == 6  # the sum of the adapters' ranks, zero padded on `v`
        np.testing.assert_allclose(delta(cat, mod, "m"), full, rtol=1e-5, atol=1e-5)
        if mod == "v":
            np.testing.assert_array_equal(c.arrays["m"]["lora_B"][3:], 0)
        u, s, vh = np.linalg.svd(full.T)
        best2 = ((u[:, :2] * s[:2]) @ vh[:2]).T  # the best rank-2 approximation
        assert svd[mod]["kernel"].spec("m").r == 2
        np.testing.assert_allclose(delta(svd, mod, "m"), best2, rtol=1e-4, atol=1e-5)


def test_dare(two):
    """DARE: the kept values are rescaled by 1 / density (NumPy reference with the mask the call
    drew), about ``density`` of them are kept, the key decides the mask, and averaged over keys
    the result is the undropped one (vmapped over 2048 keys: the call is traceable)."""
    d = 0.6
    w = [0.8, 0.0]  # `b` weighs 0, so `a`'s mask can be read off the result
    out = pj.add_weighted_adapter(
        two, ["a", "b"], w, "m", combination_type="dare_linear", density=d, key=jax.random.key(3)
    )
    n = two["q"]["kernel"]
    a = np.asarray(n.arrays["a"]["lora_A"])
    got = np.asarray(out["q"]["kernel"].arrays["m"]["lora_A"])
    mask = got != 0
    ref = np_merge(
        "dare_linear",
        [a, np.asarray(n.arrays["b"]["lora_A"])],
        [np.sqrt(0.8 * n.spec("a").scaling[0]), 0.0],
        density=d,
        masks=[mask, np.ones_like(mask)],
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert abs(mask.mean() - d) < 0.25  # 30 values
    again = pj.add_weighted_adapter(
        two, ["a", "b"], w, "m", combination_type="dare_linear", density=d, key=jax.random.key(3)
    )
    other = pj.add_weighted_adapter(
        two, ["a", "b"], w, "m", combination_type="dare_linear", density=d, key=jax.random.key(4)
    )
    np.testing.assert_array_equal(again["q"]["kernel"].arrays["m"]["lora_A"], got)
    assert not np.array_equal(other["q"]["kernel"].arrays["m"]["lora_A"], got)

    def b_factor(key):
        t = pj.add_weighted_adapter(
            two, ["a", "b"], [0.8, -1.3], "m", combination_type="dare_linear", density=d, key=key
        )
        return t["q"]["kernel"].arrays["m"]["lora_B"]

    samples = np.asarray(jax.jit(jax.vmap(b_factor))(jax.random.split(jax.random.key(5), 2048)))
    undropped = factor_ref(two, ["a", "b"], [0.8, -1.3], "linear")["q"][1]
    dev = np.abs(samples.mean(0) - undropped) / (np.abs(undropped).max())
    assert dev.max() < 0.12, dev.max()
    # B's values are kept where either adapter's is: 1 - 0.4^2 = 0.84
    assert abs((samples != 0).mean() - 0.84) < 0.02


def test_stacked_layers_match_per_layer():
    """A scanned weight with `layers_to_transform`: combined layer by layer, the new adapter on
    the union of the layers, each layer the NumPy reference of its own slices."""
    rng = np.random.default_rng(1)
    p = {"layers": {"q": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)}}}
    lay = pj.Layout("dense", stack=1)
    cfg = dict(r=2, target_modules=["q"], init_lora_weights=False)
    p = pj.inject(
        p,
        pj.LoraConfig(lora_alpha=4, layers_to_transform=[0, 1], **cfg),
        key=jax.random.key(0),
        name="a",
        layouts=lay,
    )
    p = pj.inject(
        p,
        pj.LoraConfig(lora_alpha=3, layers_to_transform=[1], **cfg),
        key=jax.random.key(1),
        name="b",
        layouts=lay,
    )
    q = pj.add_weighted_adapter(
        p, ["a", "b"], [0.5, 2.0], "m", combination_type="ties", density=0.5
    )
    n, m = p["layers"]["q"]["kernel"], q["layers"]["q"]["kernel"].spec("m")
    assert m.layers == (0, 1) and m.scaling == (1.0, 1.0, 0.0)
    for j, layer in enumerate([0, 1]):
        here = [
            (nm, wi) for nm, wi in [("a", 0.5), ("b", 2.0)] if layer in n.spec(nm).stored_layers
        ]
        ws = [wi * n.spec(nm).scaling[layer] for nm, wi in here]
        arr = [n.spec(nm).layer_arrays(n.arrays[nm], layer) for nm, _ in here]
        for f, wf in (
            ("lora_A", lambda x: np.sign(x) * np.sqrt(abs(x))),
            ("lora_B", lambda x: np.sqrt(abs(x))),
        ):
            ref = np_merge("ties", [x[f] for x in arr], [wf(x) for x in ws], density=0.5)
            np.testing.assert_allclose(
                q["layers"]["q"]["kernel"].arrays["m"][f][j], ref, rtol=1e-5, atol=1e-6
            )


# ------------------------------------------------------------------------ contract


def test_pure_and_unshared(lora):
    before = snapshot(lora)
    q = combine(lora, "ties")
    assert_unchanged(before, lora)
    for mod in ("q_proj", "conv"):
        old, new = node(lora, mod), node(q, mod)
        assert new.arrays is not old.arrays and new.arrays["x"] is not old.arrays["x"]
        assert "mix" not in old.arrays and "mix" not in old.names


def test_jit_and_traced_weights(lora):
    """Runs under `jax.jit`, with static arguments closed over and even traced weights."""
    eager = combine(lora, "ties_svd")
    m = META["ties_svd"]

    def f(p, w):
        return pj.add_weighted_adapter(p, m["adapters"], list(w), "mix", **m["kwargs"])

    jitted = jax.jit(f)(lora, jnp.asarray(m["weights"], jnp.float32))
    for mod in ("emb", "q_proj", "v_proj", "fc", "conv"):
        np.testing.assert_allclose(delta(jitted, mod), delta(eager, mod), rtol=1e-5, atol=1e-5)
    lin = jax.jit(lambda p: combine(p, "linear"))(lora)
    np.testing.assert_allclose(
        delta(lin, "q_proj"), delta(combine(lora, "linear"), "q_proj"), rtol=1e-6, atol=1e-7
    )


def test_combined_adapter_runs_and_merges(lora, base, tmp_path):
    """The new adapter is a plain LoRA adapter: `pj.apply` with it active gives the merged model,
    and `save_pretrained` / `load_pretrained` give it back."""
    q = pj.set_active(combine(lora, "cat"), "mix")

    def model(p, ids, img):
        h = p["emb"]["embedding"][ids] @ p["q_proj"]["kernel"] + p["q_proj"]["bias"]
        y = jax.lax.conv_general_dilated(
            img, p["conv"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return h @ p["fc"]["kernel"], h[..., :6] @ p["v_proj"]["kernel"], y

    ids = jnp.asarray([[1, 4, 7], [0, 9, 2]])
    img = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 2)), jnp.float32)
    got = jax.jit(pj.apply(model))(q, ids, img)
    want = model(pj.merge_and_unload(q), ids, img)
    plain = model(base, ids, img)
    for g, w, b in zip(got, want, plain):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        assert not np.allclose(g, b, atol=1e-3)  # the adapter does something
    pj.save_pretrained(q, tmp_path, name="mix")  # PEFT's layout: `<path>/mix/`
    back = pj.load_pretrained(base, tmp_path, name="mix")
    assert pj.targeted_modules(back) == pj.targeted_modules(q, "mix")
    for mod in pj.targeted_modules(q, "mix"):
        np.testing.assert_allclose(delta(back, mod), delta(q, mod), atol=1e-6)
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == META["cat"]["r"] == 8


def test_single_adapter_is_linear(lora, peft_results):
    """PEFT: one adapter means `linear`, whatever type was asked (no density or key needed)."""
    a = pj.add_weighted_adapter(lora, ["z"], [1.5], "mix", combination_type="dare_ties")
    for mod in ("q_proj", "fc"):
        want = peft_results[f"single.{mod}.lora_A"]
        np.testing.assert_allclose(factors_torch(a, mod)[0], want, rtol=1e-6)


def test_frozen_first_adapter_gives_frozen_result(lora):
    q = pj.add_weighted_adapter(
        pj.set_trainable(lora, "x", False), ["x", "y"], [1.0, 1.0], "m", combination_type="linear"
    )
    assert "m" in pj.frozen_adapters(q)
    assert "m" not in pj.frozen_adapters(combine(lora, "linear", name="m"))


# ------------------------------------------------------------------------ bad input


def _tree_with(method_cfg, base_tree):
    return pj.inject(base_tree, method_cfg, key=jax.random.key(0), name="o")


BAD = [
    (dict(adapters=["x", "nope"]), pj.AdapterNameError, "'nope'"),
    (dict(adapters=[]), pj.AdapterNameError, "at least one"),
    (dict(weights=[1.0]), pj.ConfigError, "one weight per adapter"),
    (dict(weights=[1.0, "a"]), pj.ArgumentTypeError, "weights[1]"),
    (dict(weights=[1.0, float("nan")]), pj.ConfigError, "weights[1]"),
    (dict(adapter_name="y"), pj.AdapterNameError, "already exists"),
    (dict(adapter_name=""), pj.AdapterNameError, "non-empty"),
    (dict(combination_type="mean"), pj.ConfigError, "combination_type"),
    (dict(adapters=["x", "z"], combination_type="linear"), pj.ConfigError, "ranks"),
    (dict(adapters=["x", "z"], combination_type="ties", density=0.5), pj.ConfigError, "'z': 2"),
    (dict(combination_type="ties"), pj.ConfigError, "`density` is required"),
    (dict(combination_type="magnitude_prune_svd", density=1.5), pj.ConfigError, "[0, 1]"),
    (dict(combination_type="dare_linear", density=0.5), pj.ArgumentTypeError, "key="),
    (dict(combination_type="dare_ties", density=0.0, key=0), pj.ConfigError, "density"),
    (dict(combination_type="dare_ties", density=0.5, key="k"), pj.ArgumentTypeError, "`key`"),
    (dict(svd_rank=0), pj.ConfigError, "svd_rank"),
    (dict(svd_rank=2.5), pj.ArgumentTypeError, "svd_rank"),
    (dict(svd_clamp=2.0), pj.ConfigError, "svd_clamp"),
    (dict(majority_sign_method="max"), pj.ConfigError, "majority_sign_method"),
]


@pytest.mark.parametrize("kw, err, msg", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_input(lora, kw, err, msg):
    before = snapshot(lora)
    args = {"adapters": ["x", "y"], "weights": [0.5, 0.5], "adapter_name": "mix", **kw}
    with pytest.raises(err, match=None) as info:
        pj.add_weighted_adapter(
            lora, args.pop("adapters"), args.pop("weights"), args.pop("adapter_name"), **args
        )
    assert msg in str(info.value)
    assert_unchanged(before, lora)


@pytest.mark.parametrize(
    "cfg, msg",
    [
        (pj.IA3Config(target_modules=["q_proj"]), "mix methods"),
        (pj.LoHaConfig(r=2, target_modules=["q_proj"]), "is loha"),
        (pj.LoraConfig(r=3, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (pj.LoraConfig(r=3, target_modules=["v_proj"], modules_to_save=["fc"]), None),
    ],
    ids=["mixed", "loha", "dora", "modules_to_save"],
)
def test_refused_methods(lora, cfg, msg):
    p = _tree_with(cfg, lora)
    before = snapshot(p)
    if msg is None:  # one modules_to_save copy is fine; two of one module are refused
        q = pj.add_weighted_adapter(p, ["x", "o"], [1.0, 1.0], "m", combination_type="cat")
        np.testing.assert_array_equal(
            q["fc"]["kernel"].arrays["o"]["weight"], p["fc"]["kernel"].base
        )
        assert "m" not in q["fc"]["kernel"].names  # the first adapter (x) has no copy
        q = pj.add_weighted_adapter(p, ["o", "x"], [1.0, 1.0], "m", combination_type="cat")
        fresh = q["fc"]["kernel"].arrays["m"]["weight"]  # PEFT: a new copy of the base module
        np.testing.assert_array_equal(fresh, p["fc"]["kernel"].base)
        # `fc` carries `z`'s LoRA and `o`'s copy: `z`'s LoRA there is combined
        q = pj.add_weighted_adapter(p, ["z", "o"], [1.0, 1.0], "m", combination_type="cat")
        assert q["fc"]["kernel"].spec("m").method == "lora"
        p2 = pj.inject(p, cfg, key=jax.random.key(1), name="o2")
        with pytest.raises(pj.ConfigError, match="modules_to_save"):
            pj.add_weighted_adapter(p2, ["o", "o2"], [1.0, 1.0], "m")
        return
    with pytest.raises(pj.ConfigError, match=msg):
        pj.add_weighted_adapter(p, ["x", "o"], [1.0, 1.0], "m")
    assert_unchanged(before, p)


def test_ia3_stacked_layers():
    """IA3 on scanned weights: ``sum_i w_i l_i`` per layer slice, on the modules any of the
    adapters has (``v``: only ``a``); the output-scaling weight's bias follows it."""
    rng = np.random.default_rng(2)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    p = {"layers": {"q": {"kernel": r(3, 4, 5), "bias": r(3, 5)}, "v": {"kernel": r(3, 4, 2)}}}
    lay = pj.Layout("dense", stack=1)
    for i, (name, targets) in enumerate((("a", ["q", "v"]), ("b", ["q"]))):
        cfg = pj.IA3Config(target_modules=targets, init_ia3_weights=False)
        p = pj.inject(p, cfg, key=jax.random.key(i), name=name, layouts=lay)
    q = pj.add_weighted_adapter(p, ["a", "b"], [0.5, -2.0], "m")
    assert pj.targeted_modules(q, "m") == ["layers.q", "layers.v"]
    n, new = p["layers"]["q"]["kernel"], q["layers"]["q"]["kernel"]
    assert new.spec("m").scaling == (1.0, 1.0, 1.0)
    a, b = np.asarray(n.arrays["a"]["ia3_l"]), np.asarray(n.arrays["b"]["ia3_l"])
    np.testing.assert_allclose(new.arrays["m"]["ia3_l"], 0.5 * a - 2.0 * b, rtol=1e-6)
    v = p["layers"]["v"]["kernel"].arrays["a"]["ia3_l"]
    np.testing.assert_allclose(q["layers"]["v"]["kernel"].arrays["m"]["ia3_l"], 0.5 * v, rtol=1e-6)
    merged = pj.merge_and_unload(pj.set_active(q, "m"))
    vec = np.asarray(new.arrays["m"]["ia3_l"])
    bias = np.asarray(p["layers"]["q"]["bias"].base)
    np.testing.assert_allclose(merged["layers"]["q"]["bias"], bias * vec, rtol=1e-5)
