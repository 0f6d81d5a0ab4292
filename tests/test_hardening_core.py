"""Issue 7, core hardening: purity of containers, argument errors, combine checks, frozen
(inference-mode) adapters, PEFT's parameter count on scanned layers, set_active after merge,
safe merging under jit, clear errors for adapted weights used as arrays, abstract inject, and
kernel orientation / layout keys (transformers' Flax GPT-2).

Every bad input asserts the error class, that the message names the argument, module or key
path, and that the input tree is untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import peftjax as pj
from tests.conftest import (
    assert_trees_close,
    assert_trees_equal,
    assert_unchanged,
    make_gpt2,
    nodes,
    snapshot,
)

KEY = jax.random.key(0, impl="unsafe_rbg")
LORA = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)


def _mlp():
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(0, 0.5, s).astype(np.float32))  # noqa: E731
    return {"params": {"fc1": {"kernel": r(4, 6), "bias": r(6)}, "fc2": {"kernel": r(6, 3)}}}


def _two():
    """Adapters ``a`` (active) and ``b`` on fc1/fc2."""
    q = pj.inject(_mlp(), LORA, key=KEY, name="a")
    return pj.inject(q, LORA, key=jax.random.fold_in(KEY, 1), name="b")


def _containers(tree):
    """ids of every node's outer ``arrays`` dict and per-adapter dicts."""
    out = set()
    for n in nodes(tree):
        if isinstance(n.arrays, dict):
            out.add(id(n.arrays))
            out.update(id(a) for a in n.arrays.values() if isinstance(a, dict))
    return out


def _vandalize(tree):
    """Edit every container of the output in place."""
    for n in nodes(tree):
        for a in n.arrays.values():
            if isinstance(a, dict):
                for k in list(a):
                    a[k] = jnp.full((1,), 7.0)
                a["extra"] = jnp.zeros(2)
        n.arrays["intruder"] = {"x": jnp.zeros(1)}


# ------------------------------------------------------------------------------ 1. purity

TRANSFORMS = {
    "inject": lambda q: pj.inject(q, LORA, key=KEY, name="c"),
    "set_active": lambda q: pj.set_active(q, ["a", "b"]),
    "set_active_same": lambda q: pj.set_active(q, "a"),
    "delete": lambda q: pj.delete(q, "b"),
    "merge": lambda q: pj.merge(q, "a"),
    "unmerge": lambda q: pj.unmerge(q),
    "partition_trainable": lambda q: pj.partition(q)[0],
    "partition_frozen": lambda q: pj.partition(q)[1],
    "combine": lambda q: pj.combine(*pj.partition(q)),
    "set_trainable": lambda q: pj.set_trainable(q, "a", False),
    "tree_map": lambda q: jax.tree_util.tree_map(lambda x: x, q),
    "jit": lambda q: jax.jit(lambda p: p)(q),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_outputs_share_no_container_with_the_input(name):
    q = _two()
    if name == "unmerge":
        q = pj.merge(q, "a")
    before = snapshot(q)
    ids = _containers(q)
    out = TRANSFORMS[name](q)
    assert not (_containers(out) & ids), "an output node shares an arrays dict with the input"
    _vandalize(out)
    assert_unchanged(before, q)


def test_arrays_key_paths_are_unchanged():
    q = pj.inject(_mlp(), LORA, key=KEY)
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert "['params']['fc1']['kernel'].arrays['default']['lora_A']" in paths
    assert "['params']['fc1']['kernel'].base" in paths
    # a node built from a dict does not keep that dict
    d = {"default": {"lora_A": jnp.ones((4, 2))}}
    n = pj.Adapted(jnp.ones((4, 6)), d, nodes(q)[0].specs, ("default",))
    assert n.arrays is not d and n.arrays["default"] is not d["default"]


# ------------------------------------------------------------------------------ 2. bad arguments

BAD_ARGS = {
    "set_active_int": (lambda q: pj.set_active(q, 5), "`names`", pj.AdapterNameError),
    "set_active_list_int": (lambda q: pj.set_active(q, [1]), "`names`", pj.AdapterNameError),
    "merge_int": (lambda q: pj.merge(q, 5), "`names`", pj.AdapterNameError),
    "merge_safe_str": (lambda q: pj.merge(q, safe="yes"), "`safe`", pj.ArgumentTypeError),
    "inject_key_none": (
        lambda q: pj.inject(q, LORA, key=None, name="c"),
        "`key`",
        pj.ArgumentTypeError,
    ),
    "inject_key_str": (
        lambda q: pj.inject(q, LORA, key="0", name="c"),
        "`key`",
        pj.ArgumentTypeError,
    ),
    "inject_key_array": (
        lambda q: pj.inject(q, LORA, key=jnp.ones(3), name="c"),
        "`key`",
        pj.ArgumentTypeError,
    ),
    "inject_key_bool": (
        lambda q: pj.inject(q, LORA, key=True, name="c"),
        "`key`",
        pj.ArgumentTypeError,
    ),
    "set_trainable_int": (lambda q: pj.set_trainable(q, 3), "`names`", pj.AdapterNameError),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_named_type_errors(case):
    fn, field, cls = BAD_ARGS[case]
    q = _two()
    before = snapshot(q)
    with pytest.raises(cls, match=field) as err:
        fn(q)
    assert isinstance(err.value, pj.PeftJaxError) and isinstance(err.value, TypeError)
    assert_unchanged(before, q)


def test_int_keys_are_seeds():
    p = _mlp()
    assert_trees_equal(
        pj.inject(p, LORA, key=3), pj.inject(p, LORA, key=jax.random.key(3))
    )  # typed keys, ints and numpy ints agree
    assert_trees_equal(pj.inject(p, LORA, key=np.int64(3)), pj.inject(p, LORA, key=3))
    pj.inject(p, LORA, key=jax.random.PRNGKey(0))  # raw uint32[2] keys still work


# ------------------------------------------------------------------------------ 3. combine


def test_combine_with_the_original_params_is_refused():
    p = _mlp()
    q = pj.inject(p, LORA, key=KEY)
    t, _ = pj.partition(q)
    before = snapshot(p)
    with pytest.raises(pj.PartitionError, match=r"params\.fc1\.kernel.*frozen"):
        pj.combine(t, p)
    assert_unchanged(before, p)
    with pytest.raises(pj.PartitionError, match="frozen"):
        jax.jit(pj.combine)(t, p)


def test_combine_with_the_halves_swapped_is_refused():
    # every leaf adapted: the swapped trees have the same structure, so only the check of the
    # base weights can tell
    q = pj.inject(
        {"fc": {"kernel": jnp.ones((4, 3))}}, pj.LoraConfig(r=2, target_modules=["fc"]), key=KEY
    )
    t, f = pj.partition(q)
    with pytest.raises(pj.PartitionError, match=r"fc\.kernel.*swapped"):
        pj.combine(f, t)
    with pytest.raises(pj.PartitionError, match="swapped"):
        jax.jit(pj.combine)(f, t)


def test_combine_with_mismatched_ranks_names_path_adapter_array_and_shapes():
    p = _mlp()
    t4, _ = pj.partition(pj.inject(p, LORA, key=KEY))
    cfg8 = pj.LoraConfig(r=8, target_modules=["fc1", "fc2"])
    _, f8 = pj.partition(pj.inject(p, cfg8, key=KEY))
    pat = r"params\.fc1\.kernel.*'default'.*`lora_A`.*\[4, 2\].*\[4, 8\]"
    with pytest.raises(pj.ShapeError, match=pat):
        pj.combine(t4, f8)
    with pytest.raises(pj.ShapeError, match=pat):  # static shapes only: works on tracers
        jax.jit(pj.combine)(t4, f8)
    # swapped halves: a structure error, not a raw one
    t, f = pj.partition(pj.inject(p, LORA, key=KEY))
    with pytest.raises(pj.PartitionError):
        pj.combine(f, t)
    # the right halves still combine, under jit too
    assert_trees_equal(jax.jit(pj.combine)(t, f), pj.combine(t, f))


# ------------------------------------------------------------------------------ 4. frozen adapters


def _n_lora(p, r=2):
    return sum(
        (k.shape[0] + k.shape[1]) * r
        for k in (p["params"]["fc1"]["kernel"], p["params"]["fc2"]["kernel"])
    )


def test_inference_mode_adapters_are_frozen_and_set_trainable_unfreezes():
    p = _mlp()
    cfg = pj.LoraConfig(r=2, target_modules=["fc1", "fc2"], inference_mode=True)
    q = pj.inject(p, cfg, key=KEY)
    total = sum(x.size for x in jax.tree_util.tree_leaves(p)) + _n_lora(p)
    assert pj.count_parameters(q) == (0, total)
    assert pj.frozen_adapters(q) == ("default",)
    assert not jax.tree_util.tree_leaves(pj.partition(q)[0])
    assert not any(jax.tree_util.tree_leaves(pj.trainable_mask(q)))
    assert "frozen" in pj.summary(q, print_fn=lambda s: None)
    # still acts: same forward as the trainable adapter
    qt = pj.inject(p, cfg, key=KEY, trainable=True)
    x = jnp.ones((2, 4))
    f = lambda p, x: x @ p["params"]["fc1"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(pj.apply(f)(q, x), pj.apply(f)(qt, x))
    assert pj.count_parameters(qt) == (_n_lora(p), total)
    # unfreeze / freeze; the flag survives jit and tree_map (aux data)
    u = pj.set_trainable(q, "default")
    assert pj.count_parameters(u) == (_n_lora(p), total) and pj.frozen_adapters(u) == ()
    assert pj.frozen_adapters(jax.jit(lambda t: t)(q)) == ("default",)
    assert pj.count_parameters(pj.set_trainable(qt, None, trainable=False))[0] == 0
    # PEFT's default (inference_mode=False) stays trainable
    assert pj.count_parameters(pj.inject(p, LORA, key=KEY))[0] == _n_lora(p)


def test_frozen_flag_is_per_adapter_and_delete_drops_it():
    q = pj.inject(_mlp(), LORA, key=KEY, name="a", trainable=False)
    q = pj.inject(q, LORA, key=KEY, name="b")
    q = pj.set_active(q, ["a", "b"])
    t, _ = pj.partition(q)
    assert {n for node in nodes(t) for n, a in node.arrays.items() if a} == {"b"}
    assert pj.frozen_adapters(pj.delete(q, "a")) == ()


# ------------------------------------------------------------------------------ 5. scanned counts


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_stacked_layers_to_transform_count_matches_peft():
    L, d_in, d_out, r = 4, 8, 6, 2
    p = {"layers": {"q": {"kernel": jnp.ones((L, d_in, d_out))}}}
    cfg = pj.LoraConfig(r=r, target_modules=["q"], layers_to_transform=[0, 2])
    q = pj.inject(p, cfg, key=KEY, layouts=pj.Layout("dense", stack=1))
    peft = 2 * (d_in + d_out) * r  # PEFT: one adapter per transformed layer
    assert pj.count_parameters(q) == (peft, L * d_in * d_out + peft)
    assert f"trainable params: {peft:,d}" in pj.print_trainable_parameters(q, print_fn=lambda s: 0)
    assert f"  {peft:,d}  " in pj.summary(q, print_fn=lambda s: None)
    full = pj.inject(
        p, pj.LoraConfig(r=r, target_modules=["q"]), key=KEY, layouts=pj.Layout("dense", stack=1)
    )
    assert pj.count_parameters(full)[0] == L * (d_in + d_out) * r


# ------------------------------------------------------------------------------ 6. set_active


def test_set_active_after_merge_unmerges_first_with_peft_warning():
    p = _mlp()
    q = _two()
    m = pj.merge(q, "a")
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        s = pj.set_active(m, "b")
    assert all(n.merged == () for n in nodes(s)) and pj.active(s) == ("b",)
    assert_trees_close(pj.unload(s), p, rtol=1e-5, atol=1e-5)
    x = jnp.ones((2, 4))
    f = lambda p, x: x @ p["params"]["fc1"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(
        pj.apply(f)(s, x), pj.apply(f)(pj.set_active(q, "b"), x), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------ 7. safe merge


def test_safe_merge_under_jit_is_a_clear_error():
    q = _two()
    with pytest.raises(pj.MergeError, match="concrete arrays.*outside"):
        jax.jit(lambda p: pj.merge(p, safe=True))(q)
    jax.jit(lambda p: pj.merge(p))(q)  # without safe it traces
    pj.merge(q, safe=True)  # eager safe merge works


# ------------------------------------------------------------------------------ 8. clear errors


def test_model_apply_on_adapted_params_says_use_pj_apply():
    m = nn.Dense(3)
    x = jnp.ones((1, 4))
    p = m.init(jax.random.key(0), x)
    q = pj.inject(p, pj.LoraConfig(r=1, target_modules=".*"), key=KEY)
    with pytest.raises(pj.AdaptedArrayError, match=r"pj\.apply.*merge_and_unload") as err:
        m.apply(q, x)
    assert isinstance(err.value, TypeError)
    with pytest.raises(pj.AdaptedArrayError):
        np.asarray(nodes(q)[0])


def test_three_d_kernel_error_lists_the_readings():
    p = {"attn": {"out": {"kernel": jnp.ones((2, 4, 16))}}}
    before = snapshot(p)
    with pytest.raises(pj.UnsupportedModuleError) as err:
        pj.inject(p, pj.LoraConfig(r=1, target_modules=["out"]), key=KEY)
    msg = str(err.value)
    for s in ("attn.out", "stack=1", "n_in=2", "Layout('dense')", "Layout('conv')", "2x4 inputs"):
        assert s in msg, s
    assert_unchanged(before, p)


def test_inject_on_shape_dtype_structs():
    p = _mlp()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
    qa = pj.inject(abstract, LORA, key=0)
    qc = pj.inject(p, LORA, key=0)
    assert jax.tree_util.tree_structure(qa) == jax.tree_util.tree_structure(qc)
    for a, c in zip(jax.tree_util.tree_leaves(qa), jax.tree_util.tree_leaves(qc), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (c.shape, c.dtype)
    # errors still come out as peftjax errors, and eval_shape of inject still works
    with pytest.raises(pj.TargetError):
        pj.inject(abstract, pj.LoraConfig(r=1, target_modules=["nope"]), key=0)
    jax.eval_shape(lambda t: pj.inject(t, LORA, key=jax.random.key(0)), p)


# ------------------------------------------------------------------------------ 9. orientation


def test_square_out_in_kernel_without_layout_is_refused():
    p = {"fc": {"kernel": jax.random.normal(jax.random.key(1), (4, 4))}}
    q = pj.inject(p, pj.LoraConfig(r=1, target_modules=["fc"], init_lora_weights=False), key=KEY)
    x = jnp.ones((2, 4))
    with pytest.raises(pj.LayoutError, match=r"`fc`.*transposed=True"):
        pj.apply(lambda p, x: x @ p["fc"]["kernel"].T)(q, x)
    with pytest.raises(pj.LayoutError, match="`fc`"):
        jax.jit(pj.apply(lambda p, x: jnp.einsum("oi,bi->bo", p["fc"]["kernel"], x)))(q, x)
    pj.apply(lambda p, x: x @ p["fc"]["kernel"])(q, x)  # the layout's own use
    pj.apply(lambda p, x: (x @ p["fc"]["kernel"]) @ p["fc"]["kernel"].T)(q, x)  # tied use
    # the transposed layout, used as (in, out): refused the same way
    qt = pj.inject(
        p,
        pj.LoraConfig(r=1, target_modules=["fc"]),
        key=KEY,
        layouts={"fc": pj.Layout("dense", transposed=True)},
    )
    with pytest.raises(pj.LayoutError, match=r"Layout\('dense'\)"):
        pj.apply(lambda p, x: x @ p["fc"]["kernel"])(qt, x)
    pj.apply(lambda p, x: x @ p["fc"]["kernel"].T)(qt, x)


def test_layout_keys_that_match_nothing_are_refused():
    p = _mlp()
    before = snapshot(p)
    with pytest.raises(pj.TargetError, match=r"'fc_3'.*'fc1', 'fc2'"):
        pj.inject(p, LORA, key=KEY, layouts={"fc_3": pj.Layout("dense"), "fc1": pj.Layout()})
    with pytest.raises(pj.TargetError, match="valid regex"):
        pj.inject(p, LORA, key=KEY, layouts={"fc[": pj.Layout("dense")})
    with pytest.raises(pj.ArgumentTypeError, match=r"`layouts\['fc1'\]`"):
        pj.inject(p, LORA, key=KEY, layouts={"fc1": "dense"})
    assert_unchanged(before, p)
    pj.inject(p, LORA, key=KEY, layouts={r"fc\d": pj.Layout("dense")})  # regex keys


@pytest.fixture(scope="module")
def gpt2():
    return make_gpt2(n_embd=16, n_head=2)


def test_flax_gpt2_out_in_kernels_need_transposed_layouts(gpt2):
    gm, params = gpt2
    ids = jnp.array([[1, 2, 3, 4]])
    run = lambda p, ids: gm(ids, params=p).logits  # noqa: E731
    cfg = pj.LoraConfig(r=2, target_modules=["attn.c_proj"], init_lora_weights=False)
    q = pj.inject(params, cfg, key=KEY)  # square (16, 16), stored (out, in)
    with pytest.raises(
        pj.LayoutError, match=r"`transformer\.h\.0\.attn\.c_proj`.*'c_proj'.*transposed=True"
    ):
        jax.jit(pj.apply(run))(q, ids)
    with pytest.raises(pj.TargetError, match="'c_atn'"):
        pj.inject(params, cfg, key=KEY, layouts={"c_atn": pj.Layout("dense", transposed=True)})
    qt = pj.inject(params, cfg, key=KEY, layouts={"c_proj": pj.Layout("dense", transposed=True)})
    y = jax.jit(pj.apply(run))(qt, ids)
    base = jax.jit(run)
    np.testing.assert_allclose(y, base(pj.merge_and_unload(qt), ids), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(y - base(params, ids)).max()) > 1e-3


def test_adapter_optimizer_refuses_a_non_optax_tx():
    q = pj.inject(
        {"fc": {"kernel": jnp.ones((4, 3))}}, pj.LoraConfig(target_modules=["fc"]), key=KEY
    )
    with pytest.raises(pj.ArgumentTypeError, match="`tx`: expected an optax"):
        pj.adapter_optimizer(0.1, q)
