"""Generic invariants of the pure transforms, run over one table of (method x weight kind) cases.

Every case is ``(name, config, tree family, layouts)``; every invariant is parametrised over
the table. The invariants: a fresh adapter is a zero delta; ``merge``/``unmerge`` round-trip
with non-zero adapters; ``unload(inject(p)) == p`` bit for bit; ``merge_and_unload`` keeps the
tree's structure, shapes and dtypes (also in bf16); inputs are never mutated; stacked layers
outside ``layers_to_transform`` are untouched; several named adapters compose as PEFT's do;
``safe`` merging; ``partition``/``combine``; PEFT's trainable-parameter line.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import peftjax as pj
from tests.cases import CASES, KEY, injected, methods, spread
from tests.conftest import (
    HIDDEN,
    INTER,
    KV_OUT,
    N_LAYERS,
    STACKED_LAYOUT,
    TREES,
    assert_trees_close,
    assert_trees_equal,
    assert_unchanged,
    is_adapted,
    make_llama,
    make_stacked,
    nodes,
    randomize,
    snapshot,
)

# `KEY` (an RBG key: its random-bits programs compile several times faster than threefry's;
# init values do not matter to these invariants) and `injected` (``(p, inject(p))`` of a case,
# once per session) are the case table's, shared with the forward, file, checkpoint and CLI
# suites: one injection (and its compilations) per row in a whole run.


cases = pytest.mark.parametrize("case", CASES, ids=str)
#: every method, tree family and weight kind (`spread`) in the default run; the other rows of
#: the table with ``-m slow`` (CI runs both): for the per-row numerics checks below
_SPREAD = {c.name for c in spread(CASES)}
spread_cases = pytest.mark.parametrize(
    "case",
    [c if c.name in _SPREAD else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=str,
)


# ------------------------------------------------------------------------------ invariants


@spread_cases
def test_fresh_adapter_is_zero_delta(case):
    p, q = injected(case)
    assert nodes(q), "the config targeted nothing"
    merged = pj.merge_and_unload(q)
    if case.zero_init_exact:
        assert_trees_equal(merged, p)
    else:  # DoRA: m / ||W|| * W is W only up to float rounding
        assert_trees_close(merged, p, rtol=1e-5, atol=1e-6)


@cases
def test_unload_inject_is_identity(case):
    p, q = injected(case)
    assert_trees_equal(pj.unload(q), p)
    assert pj.active(q) == ("default",)
    assert pj.adapter_names(q) == ("default",)


@spread_cases
def test_merge_unmerge_roundtrip_nonzero(case):
    p, q = injected(case)
    qr = randomize(q, seed=1)
    m = pj.merge(qr)
    # the merge really changed something
    changed = [
        not np.array_equal(np.asarray(a.base), np.asarray(b.base))
        for a, b in zip(nodes(m), nodes(qr), strict=True)
    ]
    assert any(changed)
    assert all(n.merged == ("default",) for n in nodes(m))
    back = pj.unmerge(m)
    assert all(n.merged == () for n in nodes(back))
    assert_trees_close(back, qr, rtol=1e-5, atol=2e-5)
    assert_trees_close(pj.unload(back), p, rtol=1e-5, atol=2e-5)
    # unload of a merged tree unmerges first
    assert_trees_close(pj.unload(m), p, rtol=1e-5, atol=2e-5)
    # merging twice is a no-op for already-merged adapters
    assert_trees_equal(pj.merge(m), m)


@cases
def test_merge_and_unload_keeps_structure_shapes_dtypes(case):
    p, q = injected(case)
    out = pj.merge_and_unload(randomize(q, seed=2))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(p)
    assert not any(is_adapted(x) for x in jax.tree_util.tree_leaves(out, is_leaf=is_adapted))
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(p), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


@spread_cases
def test_bf16_base(case):
    p = TREES[case.tree](dtype=jnp.bfloat16)
    q = randomize(pj.inject(p, case.config, key=KEY, layouts=case.layouts), seed=3)
    merged = pj.merge_and_unload(q)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(p)
    for a in jax.tree_util.tree_leaves(merged):
        assert a.dtype == jnp.bfloat16
    m = pj.merge(q)
    back = pj.unmerge(m)
    for a, b, mm in zip(nodes(back), nodes(q), nodes(m), strict=True):
        assert a.base.dtype == jnp.bfloat16
        x = np.asarray(a.base, np.float32)
        y = np.asarray(b.base, np.float32)
        # two bf16 roundings (after merge, after unmerge), amplified at most ~2x by IA3/DoRA's
        # division: a few ulps (2^-8 relative) of the larger of the base and the merged weight
        scale = max(np.abs(y).max(), np.abs(np.asarray(mm.base, np.float32)).max())
        np.testing.assert_allclose(x, y, rtol=0, atol=4 * 2.0**-8 * scale)


@cases
def test_inputs_never_mutated(case):
    # numpy leaves, so that an in-place update anywhere would show
    p = jax.tree_util.tree_map(lambda x: np.array(x), TREES[case.tree]())
    snap_p = snapshot(p)
    q = pj.inject(p, case.config, key=KEY, layouts=case.layouts)
    assert_unchanged(snap_p, p)
    q = randomize(q, seed=4)
    snap_q = snapshot(q)
    steps = [
        # a second adapter, frozen (AdaLoRA trains one at a time, `max_trainable`)
        lambda t: pj.inject(
            t, case.config, key=KEY, name="other", layouts=case.layouts, trainable=False
        ),
        lambda t: pj.set_active(t, None),
        lambda t: pj.set_active(t, "default"),
        pj.merge,
        pj.merge_and_unload,
        pj.unload,
        pj.partition,
        lambda t: pj.combine(*pj.partition(t)),
        lambda t: pj.delete(t, "default"),
        pj.count_parameters,
        pj.trainable_mask,
    ]
    for step in steps:
        step(q)
        assert_unchanged(snap_q, q)
    m = pj.merge(q)
    snap_m = snapshot(m)
    pj.unmerge(m)
    pj.unload(m)
    pj.merge_and_unload(m)
    assert_unchanged(snap_m, m)
    assert_unchanged(snap_q, q)
    assert_unchanged(snap_p, p)


STACKED_CASES = [c for c in CASES if c.stacked_layers is not None]


@pytest.mark.parametrize("case", STACKED_CASES, ids=str)
def test_stacked_unselected_layers_unchanged(case):
    p, q = injected(case)
    merged = pj.merge_and_unload(randomize(q, seed=5))
    sel = case.stacked_layers
    # only the transformed layer slices are stored (compact), one leading axis of len(sel)
    node = q["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert node.spec(node.names[0]).layers == tuple(sel)
    # (adapter-wide `shared` arrays, VeRA's projections, have no layer axis)
    name, spec = node.names[0], node.spec(node.names[0])
    assert {v.shape[0] for k, v in node.arrays[name].items() if k not in spec.shared} == {len(sel)}
    for path in (("mlp", "down_proj"),):
        a = np.asarray(merged["params"]["layers"][path[0]][path[1]]["kernel"])
        b = np.asarray(p["params"]["layers"][path[0]][path[1]]["kernel"])
        for i in range(a.shape[0]):
            if i in sel:
                assert not np.array_equal(a[i], b[i]), f"layer {i} of {path} not merged"
            else:
                np.testing.assert_array_equal(a[i], b[i])
    # the unstacked, untargeted leaves are untouched as well
    np.testing.assert_array_equal(
        merged["params"]["layers"]["self_attn"]["q_proj"]["kernel"],
        p["params"]["layers"]["self_attn"]["q_proj"]["kernel"],
    )


@pytest.mark.parametrize(
    "method", ["loha", "lokr_full", "lokr_decomposed", "lokr_decompose_both", "ia3_output"]
)
def test_embedding_unsupported(method):
    p = make_llama()
    snap = snapshot(p)
    cfg = methods(["embed_tokens"], ["embed_tokens"])[method]
    with pytest.raises(pj.UnsupportedModuleError, match=r"model\.embed_tokens") as err:
        pj.inject(p, cfg, key=KEY)
    assert "dense" in str(err.value) and "conv" in str(err.value)
    assert_unchanged(snap, p)


# ------------------------------------------------------------------------------ hypothesis


@st.composite
def random_trees(draw):
    """A random nesting of dicts and lists holding Dense-like modules with 2-D kernels."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    dims = st.sampled_from([2, 4])

    def module():
        n_in, n_out = draw(dims), draw(dims)
        mod = {"kernel": rng.normal(size=(n_in, n_out)).astype(np.float32)}
        if draw(st.booleans()):
            mod["bias"] = rng.normal(size=(n_out,)).astype(np.float32)
        return mod

    def node(depth):
        kind = draw(st.sampled_from(["dict", "list", "module"])) if depth < 3 else "module"
        if kind == "module":
            return module()
        children = [node(depth + 1) for _ in range(draw(st.integers(1, 3)))]
        if kind == "list":
            return children
        out = {f"m{i}": c for i, c in enumerate(children)}
        if draw(st.booleans()):
            out["norm"] = {"weight": np.ones(3, np.float32)}
        return out

    return {"net": node(1)}


@st.composite
def random_configs(draw):
    method = draw(st.sampled_from(["lora", "dora", "loha", "lokr", "ia3", "ia3_ff"]))
    r = draw(st.integers(1, 2))
    init = False  # non-zero adapters, so that merging changes the weights
    if method in ("lora", "dora"):
        return pj.LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=".*",
            use_dora=method == "dora",
            init_lora_weights=init,
        )
    if method == "loha":
        return pj.LoHaConfig(r=r, alpha=2, target_modules=".*", init_weights=init)
    if method == "lokr":
        return pj.LoKrConfig(
            r=r,
            alpha=2,
            target_modules=".*",
            init_weights=init,
            decompose_both=draw(st.booleans()),
        )
    ff = ".*" if method == "ia3_ff" else None
    return pj.IA3Config(target_modules=".*", feedforward_modules=ff, init_ia3_weights=init)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=random_trees(), config=random_configs(), seed=st.integers(0, 2**16))
def test_random_trees_never_mutated(tree, config, seed):
    snap = snapshot(tree)
    q = pj.inject(tree, config, key=jax.random.key(seed, impl="unsafe_rbg"))
    assert_unchanged(snap, tree)
    assert_trees_equal(pj.unload(q), tree)
    n_modules = sum(1 for x in jax.tree_util.tree_leaves(tree) if x.ndim == 2)
    assert len(pj.targeted_modules(q)) == n_modules
    snap_q = snapshot(q)
    for step in (
        pj.merge,
        pj.merge_and_unload,
        pj.unload,
        pj.partition,
        lambda t: pj.set_active(t, None),
        lambda t: pj.delete(t, "default"),
    ):
        step(q)
        assert_unchanged(snap_q, q)
    merged = pj.merge_and_unload(q)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tree)
    assert_unchanged(snap, tree)


# ------------------------------------------------------------------------------ several adapters

Q = ("params", "model", "layers", "0", "self_attn", "q_proj", "kernel")


def _get(tree, path=Q):
    for k in path:
        tree = tree[k]
    return tree


@pytest.fixture(scope="module")
def three():
    """LoRA "zeta" (q, v), IA3 "mid" (q), LoKr "alpha" (q, k), all with non-zero arrays."""
    p = make_llama()
    q = pj.inject(
        p,
        pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        key=KEY,
        name="zeta",
    )
    q = pj.inject(
        q,
        pj.IA3Config(target_modules=["q_proj"], init_ia3_weights=False),
        key=jax.random.key(1, impl="unsafe_rbg"),
        name="mid",
    )
    q = pj.inject(
        q,
        pj.LoKrConfig(r=8, target_modules=["q_proj", "k_proj"], init_weights=False),
        key=jax.random.key(2, impl="unsafe_rbg"),
        name="alpha",
    )
    return p, q


def _parts(q):
    node = _get(q)
    w = np.asarray(node.base, np.float64)
    lo = node.arrays["zeta"]
    d_lora = np.asarray(lo["lora_A"], np.float64) @ np.asarray(lo["lora_B"], np.float64)
    l3 = np.asarray(node.arrays["mid"]["ia3_l"], np.float64)
    return w, d_lora * node.spec("zeta").scaling[0], l3


def test_names_order_and_targets(three):
    p, q = three
    assert pj.adapter_names(q) == ("zeta", "mid", "alpha")  # injection order
    assert pj.active(q) == ("zeta",)  # as PEFT: only the first adapter is activated
    layers = range(N_LAYERS)
    assert pj.targeted_modules(q, "mid") == [f"model.layers.{i}.self_attn.q_proj" for i in layers]
    assert pj.targeted_modules(q, "alpha") == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in layers for m in ("k_proj", "q_proj")
    )
    assert pj.targeted_modules(q) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in layers for m in ("k_proj", "q_proj", "v_proj")
    )
    with pytest.raises(pj.AdapterNameError, match="nope"):
        pj.targeted_modules(q, "nope")


def test_both_active_merge_folds_both(three):
    p, q = three
    q2 = pj.set_active(q, ["zeta", "mid"])
    assert pj.active(q2) == ("zeta", "mid")
    w, d, l3 = _parts(q2)
    m = pj.merge(q2)
    assert _get(m).merged == ("zeta", "mid")
    np.testing.assert_allclose(np.asarray(_get(m).base), (w + d) * l3[None, :], atol=1e-5)
    # the same, one by name then the other
    m2 = pj.merge(pj.merge(q2, "zeta"), "mid")
    assert _get(m2).merged == ("zeta", "mid")
    np.testing.assert_allclose(np.asarray(_get(m2).base), np.asarray(_get(m).base), atol=1e-6)
    # the other order is a different weight (the adapters do not commute)
    m3 = pj.merge(pj.merge(q2, "mid"), "zeta")
    assert _get(m3).merged == ("mid", "zeta")
    np.testing.assert_allclose(np.asarray(_get(m3).base), w * l3[None, :] + d, atol=1e-5)
    # merge_and_unload of the active pair is the same weight
    np.testing.assert_allclose(
        np.asarray(_get(pj.merge_and_unload(q2))), (w + d) * l3[None, :], atol=1e-5
    )
    # unmerge takes them out last-in first-out, in either merge order
    for merged in (m, m3):
        back = pj.unmerge(merged)
        assert all(n.merged == () for n in nodes(back))
        np.testing.assert_allclose(np.asarray(_get(back).base), w, atol=1e-5)
        assert_trees_close(pj.unload(back), p, atol=1e-5)


def test_merge_named_inactive_adapter(three):
    p, q = three
    m = pj.merge(q, ["alpha"])  # not active: merging by name is allowed, as in PEFT
    assert _get(m).merged == ("alpha",)
    assert pj.active(m) == ("zeta",)
    assert _get(m, ("params", "model", "layers", "0", "self_attn", "v_proj", "kernel")).merged == ()
    assert_trees_close(pj.unload(m), p, atol=1e-5)


def test_delete_rules(three):
    p, q = three
    q2 = pj.set_active(q, ["zeta", "mid"])
    d = pj.delete(q2, "zeta")
    assert pj.active(d) == ("mid",)  # the other active ones stay active
    assert pj.adapter_names(d) == ("mid", "alpha")
    # v_proj only carried "zeta": its node is gone, the leaf is the plain array again
    v = _get(d, ("params", "model", "layers", "0", "self_attn", "v_proj", "kernel"))
    assert not is_adapted(v)
    # deleting the only active adapter activates the first of the sorted remaining names
    d2 = pj.delete(q, "zeta")  # active was ("zeta",); remaining (in order) mid, alpha
    assert pj.active(d2) == ("alpha",)
    # deleting an inactive adapter leaves the active set alone
    assert pj.active(pj.delete(q, "mid")) == ("zeta",)
    # deleting everything gives back the base tree
    gone = pj.delete(pj.delete(pj.delete(q, "zeta"), "mid"), "alpha")
    assert pj.adapter_names(gone) == () and pj.active(gone) == ()
    assert_trees_equal(gone, p)
    # a merged adapter cannot be deleted
    with pytest.raises(pj.MergeError, match="zeta"):
        pj.delete(pj.merge(q), "zeta")


def test_set_active_none(three):
    p, q = three
    for off in (None, []):
        q0 = pj.set_active(q, off)
        assert pj.active(q0) == ()
        assert pj.adapter_names(q0) == ("zeta", "mid", "alpha")
        assert_trees_equal(pj.merge_and_unload(q0), p)  # nothing to merge
        t, _ = pj.partition(q0)
        assert jax.tree_util.tree_leaves(t) == []
    assert pj.active(pj.set_active(q, "alpha")) == ("alpha",)
    with pytest.raises(pj.AdapterNameError):
        pj.set_active(q, ["zeta", "zeta"])


# ------------------------------------------------------------------------------ safe merge


def _plant_nan(q, name, array, module_path):
    def fix(path, x):
        if not is_adapted(x):
            return x
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if ".".join(names[1:-1]) != module_path:
            return x
        arrays = dict(x.arrays)
        a = dict(arrays[name])
        a[array] = a[array].at[(0,) * a[array].ndim].set(jnp.nan)
        arrays[name] = a
        return x.replace(arrays=arrays)

    return jax.tree_util.tree_map_with_path(fix, q, is_leaf=is_adapted)


@pytest.mark.parametrize(
    "config,array",
    [
        (pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora_B"),
        (pj.IA3Config(target_modules=["q_proj", "v_proj"]), "ia3_l"),
        (pj.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]), "hada_w1_a"),
    ],
    ids=["lora", "ia3", "loha"],
)
def test_safe_merge_nan(config, array):
    p = make_llama()
    q = pj.inject(p, config, key=KEY)
    bad = "model.layers.1.self_attn.v_proj"
    qn = _plant_nan(q, "default", array, bad)
    snap = snapshot(qn)
    with pytest.raises(pj.MergeError, match=re.escape(bad)):
        pj.merge(qn, safe=True)
    with pytest.raises(pj.MergeError, match=re.escape(bad)):
        pj.merge_and_unload(qn, safe=True)
    assert_unchanged(snap, qn)
    # without `safe` the NaN goes through, and only into that module
    out = pj.merge_and_unload(qn)
    assert np.isnan(
        np.asarray(out["params"]["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel"])
    ).any()
    assert np.isfinite(np.asarray(_get(out))).all()
    # finite adapters merge fine with safe=True
    assert_trees_equal(pj.merge_and_unload(q, safe=True), p)


# ------------------------------------------------------------------------------ partition / combine


@pytest.fixture(scope="module")
def two_lora():
    p = make_llama()
    q = pj.inject(
        p,
        pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        key=KEY,
        name="a",
    )
    q = pj.inject(
        q,
        pj.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False),
        key=jax.random.key(1, impl="unsafe_rbg"),
        name="b",
    )
    return p, q


def test_partition_combine_roundtrip(two_lora):
    p, q = two_lora
    t, f = pj.partition(q)
    assert_trees_equal(pj.combine(t, f), q)
    assert jax.tree_util.tree_structure(pj.combine(t, f)) == jax.tree_util.tree_structure(q)
    # trainable: exactly the active ("a") adapter's arrays, 2 per module on q and v, 3 layers
    leaves = jax.tree_util.tree_leaves(t)
    assert len(leaves) == 2 * 2 * N_LAYERS
    expected = sorted([(HIDDEN, 2), (2, HIDDEN), (HIDDEN, 2), (2, KV_OUT)] * N_LAYERS)
    assert sorted(x.shape for x in leaves) == expected
    # frozen holds no active adapter array, but the inactive "b" and every base weight
    for node in nodes(f):
        assert node.arrays["a"] is None
        assert node.base is not None
    assert sum(1 for n in nodes(f) if n.arrays.get("b") is not None) == N_LAYERS
    assert len(jax.tree_util.tree_leaves(f)) == len(jax.tree_util.tree_leaves(p)) + 2 * N_LAYERS
    # with "b" active too, its arrays move over
    t2, _ = pj.partition(pj.set_active(q, ["a", "b"]))
    assert len(jax.tree_util.tree_leaves(t2)) == 2 * 2 * N_LAYERS + 2 * N_LAYERS
    # merged adapters are not trainable
    tm, fm = pj.partition(pj.merge(q))
    assert jax.tree_util.tree_leaves(tm) == []
    assert_trees_equal(pj.combine(tm, fm), pj.merge(q))


def test_grad_and_optimizer_state_are_adapter_sized(two_lora):
    p, q = two_lora
    t, f = pj.partition(q)
    base_shapes = {x.shape for x in jax.tree_util.tree_leaves(p)}

    def loss(t):
        merged = pj.merge_and_unload(pj.combine(t, f))
        return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(merged))

    g = jax.jit(jax.grad(loss))(t)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(t)
    g_leaves = jax.tree_util.tree_leaves(g)
    assert sorted(x.shape for x in g_leaves) == sorted(
        x.shape for x in jax.tree_util.tree_leaves(t)
    )
    assert not {x.shape for x in g_leaves} & base_shapes
    assert all(
        np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() > 0 for x in g_leaves
    )
    state = optax.adam(1e-3).init(t)
    s_leaves = jax.tree_util.tree_leaves(state)
    assert not {x.shape for x in s_leaves} & base_shapes
    assert sum(x.size for x in s_leaves) == 2 * sum(x.size for x in g_leaves) + 1
    # one optimizer step keeps everything adapter-sized and recombines
    upd, _ = optax.adam(1e-3).update(g, state, t)
    q2 = pj.combine(optax.apply_updates(t, upd), f)
    assert jax.tree_util.tree_structure(q2) == jax.tree_util.tree_structure(q)
    assert_trees_equal(pj.unload(q2), p)


# ------------------------------------------------------------------------------ counting


def test_print_trainable_parameters(capsys):
    p = make_llama()
    q = pj.inject(p, pj.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"]), key=KEY)
    base = sum(x.size for x in jax.tree_util.tree_leaves(p))
    per_layer = 4 * (HIDDEN + HIDDEN) + 4 * (HIDDEN + KV_OUT) + 4 * (INTER + HIDDEN)
    trainable = N_LAYERS * per_layer
    total = base + trainable
    assert pj.count_parameters(q) == (trainable, total)
    line = (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    assert pj.print_trainable_parameters(q) == line
    assert capsys.readouterr().out.strip() == line
    text = pj.summary(q)
    out = capsys.readouterr().out
    assert out.strip() == text.strip()
    assert text.splitlines()[0] == line
    assert "model.layers.2.mlp.down_proj" in text and "lora(r=4)" in text
    assert f"{4 * (INTER + HIDDEN):,d}" in text
    # inactive adapters count in "all" only; merged ones are not trainable
    assert pj.count_parameters(pj.set_active(q, None)) == (0, total)
    assert pj.count_parameters(pj.merge(q))[0] == 0


def test_stacked_counts():
    p = make_stacked()
    q = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=KEY, layouts=STACKED_LAYOUT)
    base = sum(x.size for x in jax.tree_util.tree_leaves(p))
    trainable = 3 * 2 * (HIDDEN + HIDDEN)
    assert pj.count_parameters(q) == (trainable, base + trainable)
