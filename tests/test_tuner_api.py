"""HF PEFT's tuner-layer API as pure transforms (`peftjax.tuner_api`): disabling adapters
(``disable_adapter()``), ``set_requires_grad``, LoRA / LyCORIS ``set_scale`` / ``scale_layer`` /
``unscale_layer``, ``get_delta_weight``, and ``check_adapters_to_merge``'s warnings in
`pj.merge`.

References are NumPy (``tests/reference.py``) or values read off PEFT 0.21.2 itself (noted where
used). Every bad input asserts the error class, that the message names the argument, adapter or
module, and that the input is untouched.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from tests import reference as ref
from tests.conftest import assert_trees_equal, assert_unchanged, nodes, randomize, snapshot

KEY = jax.random.key(0)
X = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4)), jnp.float32)
LORA = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)


def _mlp():
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(0, 0.5, s).astype(np.float32))  # noqa: E731
    return {"params": {"fc1": {"kernel": r(4, 6), "bias": r(6)}, "fc2": {"kernel": r(6, 3)}}}


def fwd(p, x):
    p = p["params"]
    return jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]


def np_fwd(p, x, d1=0.0, d2=0.0):
    """NumPy forward with deltas ``d1`` / ``d2`` added to the kernels."""
    p = jax.tree_util.tree_map(np.asarray, pj.unload(p))["params"]
    h = np.tanh(np.asarray(x) @ (p["fc1"]["kernel"] + d1) + p["fc1"]["bias"])
    return h @ (p["fc2"]["kernel"] + d2)


def _two(active=("a", "b")):
    q = pj.inject(_mlp(), LORA, key=KEY, name="a")
    q = pj.inject(q, LORA, key=jax.random.fold_in(KEY, 1), name="b")
    return pj.set_active(q, list(active))


def _arrays(q, mod, name):
    return {k: np.asarray(v) for k, v in q["params"][mod]["kernel"].arrays[name].items()}


def _lora_delta(q, mod, name, scaling):
    a = _arrays(q, mod, name)
    return ref.lora_delta(a["lora_A"], a["lora_B"], scaling)


def _containers(tree):
    out = set()
    for n in nodes(tree):
        out.add(id(n.arrays))
        out.update(id(a) for a in n.arrays.values() if isinstance(a, dict))
    return out


def _scalings(q, name, mod="fc1"):
    return q["params"][mod]["kernel"].spec(name).scaling


# ----------------------------------------------------------------------- disable / enable


def test_disable_gives_base_behaviour_and_enable_restores_exactly():
    q = pj.set_requires_grad(_two(), "b", False)  # a frozen adapter stays frozen through it
    before = snapshot(q)
    d = pj.disable_adapters(q)
    assert_unchanged(before, q)
    assert not _containers(d) & _containers(q)
    # base outputs: bit-equal to the model on its base weights, and the NumPy base forward
    base = pj.unload(q)
    np.testing.assert_array_equal(pj.apply(fwd)(d, X), fwd(base, X))
    np.testing.assert_allclose(pj.apply(fwd)(d, X), np_fwd(base, X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(pj.apply(fwd)(q, X), fwd(base, X), atol=1e-3)  # adapters act
    # PEFT keeps active_adapters while disabled, and turns gradients off
    assert pj.adapters_disabled(d) and not pj.adapters_disabled(q)
    assert pj.active(d) == ("a", "b") and pj.frozen_adapters(d) == ("b",)
    assert not jax.tree_util.tree_leaves(pj.partition(d)[0])
    assert pj.count_parameters(d)[0] == 0
    assert pj.adapters_disabled(jax.jit(lambda t: t)(d))  # the flag is aux data
    assert_trees_equal(pj.disable_adapters(d), d)  # twice is once
    e = pj.enable_adapters(d)
    assert_trees_equal(e, q)  # structure (active, frozen, flags) and every leaf
    assert_trees_equal(pj.enable_adapters(q), q)
    np.testing.assert_array_equal(pj.apply(fwd)(e, X), pj.apply(fwd)(q, X))
    # nodes that are not disabled flatten exactly as before the flag existed
    assert len(nodes(q)[0].tree_flatten()[1]) == 4 and len(nodes(d)[0].tree_flatten()[1]) == 5


def test_disable_survives_other_transforms_and_no_adapter_is_an_error():
    d = pj.disable_adapters(_two(active=("a",)))
    d2 = pj.set_active(d, ["b"])  # PEFT: set_adapter inside disable_adapter() stays disabled
    assert pj.adapters_disabled(d2) and pj.active(d2) == ("b",)
    np.testing.assert_array_equal(pj.apply(fwd)(d2, X), fwd(pj.unload(d2), X))
    assert pj.active(pj.enable_adapters(d2)) == ("b",)
    assert pj.adapters_disabled(pj.delete(d, "b"))
    plain = _mlp()
    before = snapshot(plain)
    for fn in (pj.disable_adapters, pj.enable_adapters):
        with pytest.raises(pj.AdapterNameError, match=fn.__name__):
            fn(plain)
    assert_unchanged(before, plain)
    assert not pj.adapters_disabled(plain)


def test_disable_on_merged_unmerges_and_merging_disabled_params():
    q = _two(active=("a",))
    m = pj.merge(q)
    before = snapshot(m)
    with pytest.warns(UserWarning, match=r"adapters \['a'\] are merged; unmerging"):
        d = pj.disable_adapters(m)
    assert_unchanged(before, m)
    assert all(not n.merged for n in nodes(d))
    np.testing.assert_allclose(pj.apply(fwd)(d, X), fwd(pj.unload(q), X), atol=1e-5)
    # PEFT leaves the model unmerged after the context: adapted outputs, not merged
    e = pj.enable_adapters(d)
    assert all(not n.merged for n in nodes(e))
    np.testing.assert_allclose(pj.apply(fwd)(e, X), pj.apply(fwd)(q, X), atol=1e-5)
    # merge refuses disabled params; merge_and_unload merges the active ones (as PEFT's)
    before = snapshot(d)
    with pytest.raises(pj.MergeError, match="enable_adapters"):
        pj.merge(d)
    assert_unchanged(before, d)
    dq = pj.disable_adapters(q)
    assert_trees_equal(pj.merge_and_unload(dq), pj.merge_and_unload(q))
    assert_trees_equal(pj.unload(dq), pj.unload(q))


# ----------------------------------------------------------------------- requires_grad


def test_set_requires_grad_freezes_an_active_adapter():
    q = randomize(_two())
    fz = pj.set_requires_grad(q, "a", requires_grad=False)
    assert pj.frozen_adapters(fz) == ("a",) and pj.active(fz) == ("a", "b")
    np.testing.assert_array_equal(pj.apply(fwd)(fz, X), pj.apply(fwd)(q, X))  # still acts
    trainable, frozen = pj.partition(fz)
    assert {n for node in nodes(trainable) for n, a in node.arrays.items() if a} == {"b"}
    grads = jax.grad(lambda t: jnp.sum(pj.apply(fwd)(pj.combine(t, frozen), X)))(trainable)
    assert {n for node in nodes(grads) for n, a in node.arrays.items() if a} == {"b"}
    assert all(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(grads))
    n_b = pj.count_parameters(q)[0] // 2
    assert pj.count_parameters(fz)[0] == n_b
    assert_trees_equal(pj.set_requires_grad(fz, ["a"]), q)  # requires_grad=True by default
    assert_trees_equal(pj.set_requires_grad(q, []), q)


@pytest.mark.parametrize(
    "kw, err, field",
    [
        ({"adapter_names": "zz"}, pj.AdapterNameError, "adapter_names"),
        ({"adapter_names": None}, pj.AdapterNameTypeError, "adapter_names"),
        ({"adapter_names": [3]}, pj.AdapterNameTypeError, "adapter_names"),
        ({"adapter_names": "a", "requires_grad": "no"}, pj.ArgumentTypeError, "requires_grad"),
    ],
)
def test_set_requires_grad_errors(kw, err, field):
    q = _two()
    before = snapshot(q)
    with pytest.raises(err, match=field):
        pj.set_requires_grad(q, **kw)
    assert_unchanged(before, q)


# ----------------------------------------------------------------------- scaling


def test_scale_sequence_matches_peft_and_reset_restores_the_spec():
    # PEFT 0.21.2 LoraLayer, r=2, lora_alpha=8: scaling 4.0; set_scale("default", 3) -> 12.0;
    # scale_layer(2) -> 24.0; unscale_layer(4) -> 6.0; unscale_layer() -> 4.0 (run on PEFT).
    cfg = pj.LoraConfig(r=2, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False)
    q = pj.inject(_mlp(), cfg, key=KEY)
    before = snapshot(q)
    steps = [
        (lambda p: pj.set_scale(p, "default", 3), 12.0),
        (lambda p: pj.scale_layer(p, 2), 24.0),
        (lambda p: pj.unscale_layer(p, 4), 6.0),
        (lambda p: pj.unscale_layer(p), 4.0),
    ]
    p = q
    for fn, want in steps:
        new = fn(p)
        assert not _containers(new) & _containers(p)
        assert _scalings(new, "default") == (want,)
        d = pj.get_delta_weight(new, "fc1")
        np.testing.assert_allclose(d, _lora_delta(q, "fc1", "default", want), rtol=1e-6)
        np.testing.assert_allclose(
            pj.apply(fwd)(new, X), np_fwd(q, X, d1=np.asarray(d)), rtol=1e-5, atol=1e-5
        )
        p = new
    assert_unchanged(before, q)
    assert_trees_equal(p, q)  # reset: the very spec inject made (no initial_scaling kept)
    assert_trees_equal(pj.scale_layer(q, 1), q)  # PEFT: scale 1 is a no-op


def test_set_scale_uses_each_modules_alpha_over_r_and_rslora():
    for rslora in (False, True):
        cfg = pj.LoraConfig(
            r=2,
            lora_alpha=4,
            rank_pattern={"fc2": 4},
            alpha_pattern={"fc2": 3},
            use_rslora=rslora,
            target_modules=["fc1", "fc2"],
            init_lora_weights=False,
        )
        q = pj.scale_layer(pj.inject(_mlp(), cfg, key=KEY), 7.0)  # set_scale ignores this
        s = pj.set_scale(q, "default", 0.5)
        root = math.sqrt if rslora else (lambda r: r)
        want = {"fc1": 0.5 * 4 / root(2), "fc2": 0.5 * 3 / root(4)}
        for mod, w in want.items():
            assert _scalings(s, "default", mod) == pytest.approx((w,), rel=1e-12)
        d1 = _lora_delta(q, "fc1", "default", want["fc1"])
        d2 = _lora_delta(q, "fc2", "default", want["fc2"])
        np.testing.assert_allclose(pj.apply(fwd)(s, X), np_fwd(q, X, d1, d2), rtol=1e-5, atol=1e-5)
        # the merged weights follow the new scaling too
        merged = pj.merge_and_unload(s)
        np.testing.assert_allclose(
            merged["params"]["fc2"]["kernel"],
            np.asarray(_mlp()["params"]["fc2"]["kernel"]) + d2,
            rtol=1e-5,
            atol=1e-6,
        )


def test_scale_layer_touches_active_adapters_only_and_set_scale_any():
    q = _two(active=("a",))
    s = pj.scale_layer(q, 3.0)
    assert _scalings(s, "a") == (6.0,) and _scalings(s, "b") == (2.0,)
    u = pj.unscale_layer(pj.set_active(s, ["b"]))  # resets b only (a is not active)
    assert _scalings(u, "a") == (6.0,) and _scalings(u, "b") == (2.0,)
    t = pj.set_scale(q, "b", -1.5)  # inactive adapter: still set (PEFT's set_scale)
    assert _scalings(t, "b") == (-3.0,) and _scalings(t, "a") == (2.0,)
    assert_trees_equal(pj.scale_layer(pj.set_active(q, None), 5.0), pj.set_active(q, None))


def test_stacked_excluded_layers_stay_zero_and_lycoris_scales():
    lay = {"mlp": pj.Layout("dense", stack=1)}
    rng = np.random.default_rng(3)
    p = {"layers": {"mlp": {"kernel": jnp.asarray(rng.normal(0, 0.4, (4, 8, 6)), jnp.float32)}}}
    cfgs = {
        "lora": pj.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["mlp"],
            layers_to_transform=[0, 2],
            init_lora_weights=False,
        ),
        "loha": pj.LoHaConfig(
            r=2, alpha=6, target_modules=["mlp"], layers_to_transform=[0, 2], init_weights=False
        ),
    }
    for method, cfg in cfgs.items():
        q = pj.inject(p, cfg, key=KEY, layouts=lay)
        s0 = q["layers"]["mlp"]["kernel"].spec("default").scaling
        assert s0 == (cfg.scaling(2, 4 if method == "lora" else 6), 0.0, s0[0], 0.0)
        for new in (
            pj.set_scale(q, "default", 2.5),
            pj.scale_layer(pj.set_scale(q, "default", 2.5), 1.0),
            pj.unscale_layer(pj.scale_layer(q, 5.0), 2.0),
        ):
            spec = new["layers"]["mlp"]["kernel"].spec("default")
            assert spec.scaling == (2.5 * s0[0], 0.0, 2.5 * s0[0], 0.0)
            assert spec.layers == (0, 2) and spec.initial_scaling == s0
            d = np.asarray(pj.get_delta_weight(new, "layers.mlp"))
            assert d.shape == (4, 8, 6) and not d[1].any() and not d[3].any()
            a = {
                k: np.asarray(v) for k, v in q["layers"]["mlp"]["kernel"].arrays["default"].items()
            }
            for j, layer in enumerate((0, 2)):
                if method == "lora":
                    want = ref.lora_delta(a["lora_A"][j], a["lora_B"][j], 2.5 * s0[0])
                else:  # the reference takes PEFT's layouts (each factor transposed)
                    f = {k: v[j].T for k, v in a.items()}
                    want = ref.loha_delta(
                        f["hada_w1_a"],
                        f["hada_w1_b"],
                        f["hada_w2_a"],
                        f["hada_w2_b"],
                        2.5 * s0[0],
                    )
                np.testing.assert_allclose(d[layer], want, rtol=1e-5, atol=1e-6)
        assert_trees_equal(pj.unscale_layer(pj.set_scale(q, "default", 9)), q)


def test_scale_skips_copies_and_refuses_methods_without_a_scale():
    # LoRA with modules_to_save: the copies have no scale and are left as they are
    cfg = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"])
    q = pj.inject(_mlp(), cfg, key=KEY)
    s = pj.set_scale(q, "default", 2.0)
    assert _scalings(s, "default") == (4.0,)
    assert s["params"]["fc2"]["kernel"].spec("default") == q["params"]["fc2"]["kernel"].spec(
        "default"
    )
    ia3 = pj.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    r = pj.inject(q, ia3, key=KEY, name="i")
    r = pj.set_active(r, ["default", "i"])
    before = snapshot(r)
    for call in (
        lambda: pj.set_scale(r, "i", 2.0),
        lambda: pj.scale_layer(r, 2.0),
        lambda: pj.unscale_layer(r),
    ):
        with pytest.raises(pj.UnsupportedModuleError, match=r"\['i'\] \(method ia3\)"):
            call()
    assert_unchanged(before, r)


def test_scale_errors():
    q = _two(active=("a",))
    m = pj.merge(q)
    before, before_m = snapshot(q), snapshot(m)
    cases = [
        (lambda: pj.set_scale(q, "zz", 2.0), pj.AdapterNameError, "`adapter`: no adapter"),
        (lambda: pj.set_scale(q, 1, 2.0), pj.AdapterNameTypeError, "adapter"),
        (lambda: pj.set_scale(q, "a", "2"), pj.ArgumentTypeError, "`scale`"),
        (lambda: pj.set_scale(q, "a", True), pj.ArgumentTypeError, "`scale`"),
        (lambda: pj.scale_layer(q, float("nan")), pj.ArgumentTypeError, "`scale`.*finite"),
        (lambda: pj.unscale_layer(q, 0), pj.ArgumentTypeError, "`scale`.*nonzero"),
        (lambda: pj.scale_layer(m, 2.0), pj.MergeError, "'a' is merged into `fc1`"),
        (lambda: pj.set_scale(m, "a", 2.0), pj.MergeError, "unmerge"),
        (lambda: pj.scale_layer(_mlp(), 2.0), pj.AdapterNameError, "no adapter"),
        (
            lambda: jax.jit(lambda s: pj.scale_layer(q, s))(2.0),
            pj.ArgumentTypeError,
            "traced",
        ),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
    assert_unchanged(before, q)
    assert_unchanged(before_m, m)
    assert _scalings(pj.set_scale(q, "a", np.float32(0.5)), "a") == (1.0,)


# ----------------------------------------------------------------------- get_delta_weight


def test_get_delta_weight_dense_dora_and_general_layouts():
    q = randomize(_two(active=("a",)))
    before = snapshot(q)
    d = pj.get_delta_weight(q, "fc2", "b")  # inactive adapters have a delta too
    assert d.dtype == jnp.float32 and d.shape == (6, 3)
    np.testing.assert_allclose(d, _lora_delta(q, "fc2", "b", 2.0), rtol=1e-6, atol=1e-7)
    assert_unchanged(before, q)
    # additive: base + delta is the merged weight, merged or not
    m = pj.merge(q, ["b"])
    np.testing.assert_array_equal(pj.get_delta_weight(m, "fc2", "b"), d)
    np.testing.assert_allclose(
        m["params"]["fc2"]["kernel"].base - _mlp()["params"]["fc2"]["kernel"], d, atol=1e-6
    )
    # DoRA: PEFT's get_delta_weight is the low-rank part scale * A @ B, in bf16 models float32
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _mlp())
    dora = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], use_dora=True)
    qd = randomize(pj.inject(p16, dora, key=KEY))
    dd = pj.get_delta_weight(qd, "fc1")
    assert dd.dtype == jnp.float32
    np.testing.assert_allclose(dd, _lora_delta(qd, "fc1", "default", 2.0), rtol=1e-6, atol=1e-7)
    # DenseGeneral (heads, head_dim, out) kernel and a transposed (out, in) one: the base's shape
    rng = np.random.default_rng(5)
    g = {
        "attn": {"out": {"kernel": jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)}},
        "t": {"kernel": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)},
    }
    lays = {"out": pj.Layout("dense", n_in=2), "t": pj.Layout("dense", transposed=True)}
    cfg = pj.LoraConfig(r=3, lora_alpha=6, target_modules=["out", "t"], init_lora_weights=False)
    qg = pj.inject(g, cfg, key=KEY, layouts=lays)
    merged = pj.merge_and_unload(qg)
    for mod, path in (("attn.out", ("attn", "out")), ("t", ("t",))):
        dg = pj.get_delta_weight(qg, mod)
        base, new = g, merged
        for k in path:
            base, new = base[k], new[k]
        assert dg.shape == base["kernel"].shape
        np.testing.assert_allclose(base["kernel"] + dg, new["kernel"], rtol=1e-5, atol=1e-5)
    a = {k: np.asarray(v) for k, v in qg["t"]["kernel"].arrays["default"].items()}
    np.testing.assert_allclose(
        pj.get_delta_weight(qg, "t"), ref.lora_delta(a["lora_A"], a["lora_B"], 2.0).T, rtol=1e-5
    )


def test_get_delta_weight_errors():
    q = _two()
    q = pj.inject(q, pj.IA3Config(target_modules=["fc1"]), key=KEY, name="i")
    before = snapshot(q)
    cases = [
        (lambda: pj.get_delta_weight(q, "fc1", "i"), pj.UnsupportedModuleError, "method ia3"),
        (
            lambda: pj.get_delta_weight(q, "fc3", "a"),
            pj.TargetError,
            "no module `fc3`; adapter 'a' is on",
        ),
        (
            lambda: pj.get_delta_weight(q, "fc2", "i"),
            pj.TargetError,
            "module `fc2` carries no adapter 'i'; adapter 'i' is on \\['fc1'\\]",
        ),
        (lambda: pj.get_delta_weight(q, "fc1", "zz"), pj.AdapterNameError, "`name`"),
        (lambda: pj.get_delta_weight(q, 1, "a"), pj.ArgumentTypeError, "`module_path`"),
        (lambda: pj.get_delta_weight(q, "fc1", None), pj.AdapterNameTypeError, "`name`"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
    assert_unchanged(before, q)


# ----------------------------------------------------------------------- merge warnings


def test_merge_warns_as_check_adapters_to_merge():
    q = _two(active=("a",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first merge does not warn
        m = pj.merge(q)
    before = snapshot(m)
    with pytest.warns(UserWarning, match="^All adapters are already merged, nothing to do.$"):
        again = pj.merge(m)
    assert_trees_equal(again, m)
    assert_unchanged(before, m)
    with pytest.warns(
        UserWarning,
        match="^Already following adapters were merged a. You are now additionally merging b.$",
    ):
        mb = pj.merge(m, ["a", "b"])
    assert [n.merged for n in nodes(mb)] == [("a", "b")] * 2
    np.testing.assert_allclose(
        mb["params"]["fc1"]["kernel"].base,
        pj.merge(q, ["a", "b"])["params"]["fc1"]["kernel"].base,
        atol=1e-6,
    )
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        assert_trees_equal(pj.merge_and_unload(m), pj.merge_and_unload(q))


def test_summary_says_disabled_adapters_act_as_the_base():
    p = {"q": {"kernel": jnp.ones((4, 6))}}
    q = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q"]), key=0)
    quiet = lambda s: None  # noqa: E731
    assert "active, disabled" not in pj.summary(q, print_fn=quiet)
    assert "active, disabled" in pj.summary(pj.disable_adapters(q), print_fn=quiet)
    assert "active, disabled" not in pj.summary(
        pj.enable_adapters(pj.disable_adapters(q)), print_fn=quiet
    )
