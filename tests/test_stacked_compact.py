"""Stacked (scanned) weights with ``layers_to_transform`` store only the transformed layers.

A ``Layout(stack=...)`` weight whose adapter covers ``k`` of its ``L`` layer slices has arrays
with one leading axis of ``k`` (`Spec.layers` names the slices); the excluded slices have no
arrays, gradients, optimizer state or parameter count (PEFT's count), and stay exactly at the
base in `pj.apply`, `merge` and the files.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax import io as pio
from peftjax.checkpoint import AdapterCheckpointer

L, D_IN, D_OUT, R = 4, 8, 6, 2
LAY = {"mlp": pj.Layout("dense", stack=1)}
KEY = jax.random.key(3)

CONFIGS = {
    "lora": lambda ltt: pj.LoraConfig(
        r=R, lora_alpha=4, target_modules=["mlp"], layers_to_transform=ltt, init_lora_weights=False
    ),
    "dora": lambda ltt: pj.LoraConfig(
        r=R,
        use_dora=True,
        target_modules=["mlp"],
        layers_to_transform=ltt,
        init_lora_weights=False,
    ),
    "loha": lambda ltt: pj.LoHaConfig(
        r=R, target_modules=["mlp"], layers_to_transform=ltt, init_weights=False
    ),
    "lokr": lambda ltt: pj.LoKrConfig(
        r=R, target_modules=["mlp"], layers_to_transform=ltt, init_weights=False
    ),
}
#: PEFT's parameter count of one adapted (D_IN -> D_OUT) layer
PER_LAYER = {
    "lora": R * (D_IN + D_OUT),
    "dora": R * (D_IN + D_OUT) + D_OUT,
    "loha": 2 * R * (D_IN + D_OUT),
    "lokr": 2 * 2 + 4 * 3,  # D_OUT = 2 * 3, D_IN = 2 * 4: w1 (2, 2), w2 (4, 3) (r=2 not < 3/2)
}


def base(seed=0, shape=(L, D_IN, D_OUT)):
    rng = np.random.default_rng(seed)
    return {"layers": {"mlp": {"kernel": jnp.asarray(rng.normal(0, 0.4, shape), jnp.float32)}}}


def xs(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(5, D_IN)), jnp.float32)


def per_layer(p, x):
    """Every layer's output on the same input (so each layer's effect is visible)."""
    return jax.lax.scan(lambda h, w: (h, jnp.tanh(h @ w)), x, p["layers"]["mlp"]["kernel"])[1]


def node(tree):
    return tree["layers"]["mlp"]["kernel"]


def inject(method, ltt, p=None, **kw):
    return pj.inject(base() if p is None else p, CONFIGS[method](ltt), key=KEY, layouts=LAY, **kw)


def _fast(*keep):
    """The methods as params; those not in ``keep`` run with `-m slow` (compile-heavy)."""
    return [pytest.param(m, marks=[] if m in keep else [pytest.mark.slow]) for m in CONFIGS]


@pytest.mark.parametrize("method", _fast("lora", "loha", "ia3"))
def test_stores_k_slices_with_todays_values(method):
    q, full = inject(method, [1, 3]), inject(method, None)
    spec, arrays = node(q).spec("default"), node(q).arrays["default"]
    assert spec.layers == (1, 3) and spec.compact
    assert len(spec.scaling) == L and spec.scaling[0] == spec.scaling[2] == 0
    want = node(full).arrays["default"]
    assert sorted(arrays) == sorted(want)
    for k, v in arrays.items():
        assert v.shape == (2, *want[k].shape[1:]), k
        # a transformed layer gets exactly the values a full-stack injection gives it
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k])[[1, 3]], err_msg=k)
    assert not node(full).spec("default").compact
    # PEFT's analytic count: one adapter per transformed layer, no special case
    base_n = L * D_IN * D_OUT
    assert pj.count_parameters(q) == (2 * PER_LAYER[method], base_n + 2 * PER_LAYER[method])
    assert pj.count_parameters(full)[0] == L * PER_LAYER[method]
    assert f"  {2 * PER_LAYER[method]:,d}  " in pj.summary(q, print_fn=lambda s: None)


@pytest.mark.parametrize("method", _fast("lora", "ia3"))
def test_apply_and_gradients_equal_the_merged_model(method):
    p, x = base(), xs()
    q = inject(method, [1, 3])
    ys, yb = pj.apply(per_layer)(q, x), per_layer(p, x)
    for i in (0, 2):  # excluded layers: exactly the base
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(yb[i]))
    for i in (1, 3):
        assert not np.allclose(ys[i], yb[i])
    np.testing.assert_allclose(ys, per_layer(pj.merge_and_unload(q), x), atol=2e-6)

    # gradients: only the stored slices get one, equal to those of a full-stack adapter with
    # scale 0 on the excluded layers (the storage before compaction); and, but for DoRA (whose
    # forward stops the norm's gradient, as PEFT), to the gradients through the merged weights
    full = inject(method, None)
    spec = node(full).spec("default")
    off = dataclasses.replace(
        spec, scaling=tuple(s if i in (1, 3) else 0.0 for i, s in enumerate(spec.scaling))
    )
    full = {"layers": {"mlp": {"kernel": node(full).replace(specs=(("default", off),))}}}
    loss = lambda fn, q: lambda t: jnp.sum(fn(pj.combine(t, pj.partition(q)[1]), x) ** 2)
    apply_fn = pj.apply(per_layer)
    merged_fn = lambda p, x: per_layer(pj.merge_and_unload(p), x)
    g = node(jax.grad(loss(apply_fn, q))(pj.partition(q)[0])).arrays["default"]
    g_full = node(jax.grad(loss(apply_fn, full))(pj.partition(full)[0])).arrays["default"]
    g_merged = node(jax.grad(loss(merged_fn, q))(pj.partition(q)[0])).arrays["default"]
    for k in g:
        assert g[k].shape[0] == 2, k
        np.testing.assert_allclose(g[k], np.asarray(g_full[k])[[1, 3]], rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(g_full[k])[[0, 2]]), k
        if method != "dora":
            np.testing.assert_allclose(g[k], g_merged[k], rtol=2e-4, atol=2e-5, err_msg=k)
    # under jit as well
    np.testing.assert_allclose(jax.jit(pj.apply(per_layer))(q, x), ys, atol=1e-6)


@pytest.mark.parametrize("method", _fast("lora", "dora", "loha"))
def test_merge_unmerge_round_trip(method):
    p = base()
    q = inject(method, [1, 3])
    m = pj.merge(q)
    w, w0 = node(m).base, node(q).base
    for i in (0, 2):
        np.testing.assert_array_equal(np.asarray(w[i]), np.asarray(w0[i]))
    assert not np.allclose(w[1], w0[1]) and not np.allclose(w[3], w0[3])
    u = pj.unmerge(m)
    np.testing.assert_allclose(node(u).base, w0, atol=2e-6)
    assert {k: v.shape for k, v in node(u).arrays["default"].items()} == {
        k: v.shape for k, v in node(q).arrays["default"].items()
    }
    np.testing.assert_allclose(
        pj.apply(per_layer)(m, xs()), pj.apply(per_layer)(q, xs()), atol=2e-6
    )
    np.testing.assert_array_equal(np.asarray(w0), np.asarray(p["layers"]["mlp"]["kernel"]))


@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
def test_save_load_round_trip_writes_only_transformed_layers(method, tmp_path):
    q = inject(method, [1, 3])
    pio.save_pretrained(q, tmp_path / "a")
    t, _ = pio.read_safetensors(tmp_path / "a" / pio.WEIGHTS_NAME)
    layers = {k.split(".layers.")[1].split(".")[0] for k in t}
    assert layers == {"1", "3"}
    back = pio.load_pretrained(base(), tmp_path / "a", layouts=LAY)
    s1, s2 = node(q).spec("default"), node(back).spec("default")
    assert s2.layers == (1, 3)
    np.testing.assert_allclose(s2.scaling, s1.scaling, rtol=1e-12)
    a1, a2 = node(q).arrays["default"], node(back).arrays["default"]
    assert sorted(a1) == sorted(a2)
    for k in a1:
        np.testing.assert_array_equal(np.asarray(a2[k]), np.asarray(a1[k]), err_msg=k)
    pio.save_pretrained(back, tmp_path / "b")
    t2, _ = pio.read_safetensors(tmp_path / "b" / pio.WEIGHTS_NAME)
    assert sorted(t2) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(t2[k], t[k])


def test_load_file_with_some_layers_is_compact_and_ia3_bias_follows(tmp_path):
    """An IA3 file (no layers_to_transform in PEFT) with layers 0 and 2 of a stacked, biased
    module loads compact; the bias of an absent layer is untouched (expand fills ones)."""
    rng = np.random.default_rng(4)
    p = base()
    p["layers"]["mlp"]["bias"] = jnp.asarray(rng.normal(size=(L, D_OUT)), jnp.float32)
    cfg = pj.IA3Config(target_modules=["mlp"], init_ia3_weights=False)
    full = pj.inject(p, cfg, key=KEY, layouts=LAY)
    pio.save_pretrained(full, tmp_path)
    t, meta = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)
    t = {k: v for k, v in t.items() if ".layers.1." not in k and ".layers.3." not in k}
    pio.write_safetensors(tmp_path / pio.WEIGHTS_NAME, t, meta)
    part = pio.load_pretrained(p, tmp_path, layouts=LAY, strict=False)
    spec = node(part).spec("default")
    assert spec.layers == (0, 2) and node(part).arrays["default"]["ia3_l"].shape == (2, D_OUT)

    def fwd(p, x):
        mlp = p["layers"]["mlp"]
        return jax.lax.scan(lambda h, wb: (h, h @ wb[0] + wb[1]), x, (mlp["kernel"], mlp["bias"]))[
            1
        ]

    x = xs()
    ys, yb = pj.apply(fwd)(part, x), fwd(p, x)
    for i in (1, 3):
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(yb[i]))
    np.testing.assert_allclose(ys, fwd(pj.merge_and_unload(part), x), atol=2e-6)
    np.testing.assert_allclose(
        np.asarray(ys)[[0, 2]], np.asarray(pj.apply(fwd)(full, x))[[0, 2]], atol=1e-6
    )
    merged = pj.merge_and_unload(part)["layers"]["mlp"]
    for i in (1, 3):
        np.testing.assert_array_equal(
            np.asarray(merged["bias"][i]), np.asarray(p["layers"]["mlp"]["bias"][i])
        )
    pio.save_pretrained(part, tmp_path / "again")
    assert sorted(pio.read_safetensors(tmp_path / "again" / pio.WEIGHTS_NAME)[0]) == sorted(t)


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_two_stack_axes_compact_over_flat_layer_indices():
    p = base(shape=(2, 3, D_IN, D_IN))
    p = {"blocks": p["layers"]["mlp"]}
    cfg = pj.LoraConfig(r=R, target_modules=["blocks"], layers_to_transform=[1, 4])
    cfg = dataclasses.replace(cfg, init_lora_weights=False)
    q = pj.inject(p, cfg, key=KEY, layouts=pj.Layout("dense", stack=2))
    n = q["blocks"]["kernel"]
    assert n.spec("default").layers == (1, 4)
    assert n.arrays["default"]["lora_A"].shape == (2, D_IN, R)
    x = xs()

    def nested(p, x):
        def outer(h, ws):
            return h, jax.lax.scan(lambda h, w: (h, jnp.tanh(h @ w)), h, ws)[1]

        return jax.lax.scan(outer, x, p["blocks"]["kernel"])[1]

    ys, yb = pj.apply(nested)(q, x), nested(p, x)
    np.testing.assert_allclose(ys, nested(pj.merge_and_unload(q), x), atol=2e-6)
    flat_y, flat_b = ys.reshape(6, *ys.shape[2:]), yb.reshape(6, *yb.shape[2:])
    for i in (0, 2, 3, 5):
        np.testing.assert_array_equal(np.asarray(flat_y[i]), np.asarray(flat_b[i]))
    for i in (1, 4):
        assert not np.allclose(flat_y[i], flat_b[i])


def test_spec_layers_validated_and_normalised():
    q = inject("lora", [1])
    spec = node(q).spec("default")
    assert dataclasses.replace(spec, layers=(0, 1, 2, 3), scaling=(2.0,) * L).layers is None
    with pytest.raises(pj.ShapeError, match="nonzero scaling"):
        dataclasses.replace(spec, layers=(0,))
    with pytest.raises(pj.ShapeError, match="sorted, distinct"):
        dataclasses.replace(spec, layers=(1, 1))
    with pytest.raises(pj.ShapeError, match="sorted, distinct"):
        dataclasses.replace(spec, layers=(7,))
    # expand: full stack, identity (zeros) on the excluded slices
    full = spec.expand(node(q).arrays["default"])
    assert full["lora_A"].shape == (L, D_IN, R)
    assert not np.any(np.asarray(full["lora_A"])[[0, 2, 3]])


def _step_and_state(ltt):
    p = base(shape=(L, 32, 32))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 32)), jnp.float32)
    cfg = pj.LoraConfig(r=4, target_modules=["mlp"], layers_to_transform=ltt)
    q = pj.inject(p, cfg, key=KEY, layouts=LAY)
    t, f = pj.partition(q)
    opt = optax.adam(1e-3)
    state = opt.init(t)

    def fwd(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["mlp"]["kernel"])[
            0
        ]

    def step(t, state, f, x):
        g = jax.grad(lambda t: jnp.mean(pj.apply(fwd)(pj.combine(t, f), x) ** 2))(t)
        u, state = opt.update(g, state, t)
        return optax.apply_updates(t, u), state

    compiled = jax.jit(step).lower(t, state, f, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out_t, out_state = jax.eval_shape(step, t, state, f, x)
    size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
    return cost["flops"], size(state), size(out_state), size(out_t)


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_train_step_state_and_flops_scale_with_transformed_layers():
    flops_1, state_1, out_state_1, t_1 = _step_and_state([1])
    flops_all, state_all, out_state_all, t_all = _step_and_state(None)
    per_layer = 4 * (32 + 32)
    assert t_1 == per_layer and t_all == L * per_layer
    # adam's mu and nu (plus its step count) on the trainable part: k / L of the full size
    assert state_1 - 1 == 2 * per_layer and state_all - 1 == 2 * L * per_layer
    assert out_state_1 == state_1 and out_state_all == state_all
    # the excluded layers' adapter matmuls still run with scale 0 inside the scan (adapter FLOPs
    # only); the step never costs more than adapting every layer
    assert flops_1 <= flops_all, (flops_1, flops_all)


def test_checkpoint_round_trip_and_other_layers_refused(tmp_path):
    q = inject("lora", [1, 3])
    t, f = pj.partition(q)
    opt = optax.adam(1e-2)
    with AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(0, q, opt.init(t))
        target = pj.inject(base(), CONFIGS["lora"]([1, 3]), key=jax.random.key(9), layouts=LAY)
        r, o, _ = ckpt.restore(target, opt.init(pj.partition(target)[0]))
        a1, a2 = node(q).arrays["default"], node(r).arrays["default"]
        for k in a1:
            np.testing.assert_array_equal(np.asarray(a2[k]), np.asarray(a1[k]))
        other = pj.inject(base(), CONFIGS["lora"]([0, 2]), key=KEY, layouts=LAY)
        with pytest.raises(pj.ShapeError, match="layers_to_transform"):
            ckpt.restore(other)
        every = pj.inject(base(), CONFIGS["lora"](None), key=KEY, layouts=LAY)
        with pytest.raises(pj.ShapeError, match="layers_to_transform"):
            ckpt.restore(every)
