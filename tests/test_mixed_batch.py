"""Mixed-adapter batches: ``pj.apply(fn, adapter_ids=...)`` (HF PEFT's ``adapter_names=``).

Each row of a mixed batch must equal that example run alone with its adapter active (or the
base model for ``None`` / ``-1``), on plain trees, a scanned-layer tree, embeddings, nnx and
transformers' FlaxLlama; a training step over a mixed batch must give each adapter exactly the
gradient of its own examples; traced int ids must serve any mix from one compilation.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from tests.conftest import (
    STACKED_LAYOUT,
    assert_unchanged,
    make_hf_llama,
    make_llama,
    make_stacked,
    randomize,
    snapshot,
)
from tests.test_forward import _llama_fn, _nnx_fn, _stacked_fn

IDS = jnp.array([[1, 5, 31, 0, 7], [2, 2, 9, 30, 4], [3, 8, 8, 1, 0], [4, 4, 6, 2, 9]] * 2)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _inject_all(p, specs, layouts=None):
    for i, (name, cfg) in enumerate(specs):
        kw = {} if layouts is None else {"layouts": layouts}
        p = pj.inject(p, cfg, key=jax.random.key(i), name=name, **kw)
    return randomize(p, seed=3)


IA3 = pj.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
#: adapters of different methods, ranks, alphas and targets on one llama tree
LLAMA_ADAPTERS = [
    ("lora2", pj.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")),
    ("lora4", pj.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=ATTN)),
    ("dora", pj.LoraConfig(r=3, use_dora=True, target_modules=["q_proj", "up_proj"])),
    ("ia3", IA3),
    ("lokr", pj.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "gate_proj"])),
    ("emb", pj.LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "o_proj"])),
]
NAMES = ["lora2", None, "lora4", "dora", "ia3", "lokr", "emb", "lora2"]


@pytest.fixture(scope="module")
def llama_mixed():
    return _inject_all(make_llama(), LLAMA_ADAPTERS)


def _close(got, want, tol=2e-5, msg=""):
    """Equal up to ``tol`` relative to the largest value (randomized adapters give outputs of
    size ~1e3, where float32 reassociation alone moves a value by ~1e-4)."""
    atol = tol * max(1.0, float(jnp.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=msg)


def _alone(fn, p, x, name):
    return jax.jit(pj.apply(fn))(pj.set_active(p, [] if name is None else name), x)


def _assert_rows(fn, p, x, names, tol=2e-5):
    out = jax.jit(pj.apply(fn, adapter_ids=names))(p, x)
    for i, n in enumerate(names):
        ref = _alone(fn, p, x[i : i + 1], n)
        _close(out[i : i + 1], ref, tol, f"row {i} {n}")
    return out


def test_rows_equal_each_adapter_alone(llama_mixed):
    before = snapshot(llama_mixed)
    out = _assert_rows(_llama_fn, llama_mixed, IDS, NAMES)
    assert_unchanged(before, llama_mixed)
    # the rows differ from the base's: every adapter is in effect
    base = pj.apply(_llama_fn)(pj.set_active(llama_mixed, []), IDS)
    for i, n in enumerate(NAMES):
        diff = float(jnp.abs(out[i] - base[i]).max())
        assert (diff == 0.0) == (n is None), (n, diff)


def test_traced_int_ids_one_compile(llama_mixed):
    names = pj.adapter_names(llama_mixed)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(p, x, ids):
        return pj.apply(_llama_fn, adapter_ids=ids)(p, x)

    by_name = jax.jit(pj.apply(_llama_fn, adapter_ids=NAMES))(llama_mixed, IDS)
    ids = jnp.array([-1 if n is None else names.index(n) for n in NAMES])
    _close(serve(llama_mixed, IDS, ids), by_name)
    other = ids[::-1]
    got = serve(llama_mixed, IDS, other)
    _close(got, jax.jit(pj.apply(_llama_fn, adapter_ids=NAMES[::-1]))(llama_mixed, IDS))
    chex.clear_trace_counter()


def test_gradients_are_each_adapters_own():
    """One step over a mixed batch: each adapter's gradient is that of its own examples
    (the sum of per-example losses), and adapters no example uses get zero."""
    p = _inject_all(make_llama(n_layers=1), LLAMA_ADAPTERS)
    p = pj.set_active(p, [n for n, _ in LLAMA_ADAPTERS])
    names = ["lora2", "dora", None, "lokr", "lora2", "ia3", "dora", "lora2"]
    tr, fr = pj.partition(p)

    def loss(tr, x, ids):
        return jnp.sum(jnp.square(pj.apply(_llama_fn, adapter_ids=ids)(pj.combine(tr, fr), x)))

    g = jax.jit(jax.grad(loss), static_argnums=2)(tr, IDS, tuple(names))
    for name, _ in LLAMA_ADAPTERS:
        rows = [i for i, n in enumerate(names) if n == name]
        alone_tr, alone_fr = pj.partition(pj.set_active(p, name))

        def loss_alone(t, x, fr=alone_fr):
            return jnp.sum(jnp.square(pj.apply(_llama_fn)(pj.combine(t, fr), x)))

        want = jax.jit(jax.grad(loss_alone))(alone_tr, IDS[jnp.array(rows)]) if rows else None
        got_leaves = _adapter_leaves(g, name)
        assert got_leaves, name
        if want is None:
            assert all(float(jnp.abs(v).max()) == 0.0 for v in got_leaves.values()), name
            continue
        want_leaves = _adapter_leaves(want, name)
        assert got_leaves.keys() == want_leaves.keys()
        for k in want_leaves:
            _close(got_leaves[k], want_leaves[k], 1e-4, f"{name} {k}")


def _adapter_leaves(tree, name):
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None):
        keys = jax.tree_util.keystr(path)
        if v is not None and f"['{name}']" in keys:
            out[keys] = v
    return out


def test_scanned_layers():
    p = _inject_all(
        make_stacked(),
        [
            ("a", pj.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
            ("b", pj.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)),
            ("c", pj.LoraConfig(r=1, target_modules=["v_proj"], layers_to_transform=[0, 2])),
        ],
        layouts=STACKED_LAYOUT,
    )
    _assert_rows(_stacked_fn, p, IDS[:5], ["a", "b", None, "c", "a"])


def test_nnx(nnx_state):
    p = _inject_all(
        nnx_state,
        [
            ("a", pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
            ("b", pj.LoKrConfig(r=2, target_modules=["v_proj"])),
        ],
    )
    _assert_rows(_nnx_fn, p, IDS[:3, :3], ["b", None, "a"])


@pytest.mark.slow
def test_flax_llama(hf_llama_tiny):
    fm, params, ids = hf_llama_tiny
    p = _inject_all(
        params,
        [
            ("a", pj.LoraConfig(r=2, target_modules=ATTN)),
            ("b", pj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
            ("c", pj.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"])),
        ],
    )
    ids3 = jnp.concatenate([ids, ids[:1]])
    _assert_rows(lambda q, x: fm(x, params=q).logits, p, ids3, ["a", "c", "b"], tol=5e-5)


@pytest.fixture(scope="module")
def hf_llama_tiny():
    pytest.importorskip("transformers")
    model, params = make_hf_llama(layers=1)
    return model, params, jnp.array([[1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14]])


# ------------------------------------------------------------------------------------ bad input


def _small():
    p = make_llama()
    p = pj.inject(p, pj.LoraConfig(r=2, target_modules=ATTN), key=jax.random.key(0), name="a")
    return p


def test_unknown_name_and_index():
    p = _small()
    with pytest.raises(pj.errors.AdapterNameError, match=r"unknown adapter\(s\) \['nope'\]"):
        pj.apply(_llama_fn, adapter_ids=["a", "nope"])(p, IDS[:2])
    with pytest.raises(pj.errors.AdapterNameError, match="index 3 is out of range"):
        pj.apply(_llama_fn, adapter_ids=np.array([0, 3]))(p, IDS[:2])
    with pytest.raises(pj.ArgumentTypeError, match="not a single string"):
        pj.apply(_llama_fn, adapter_ids="a")(p, IDS[:2])
    with pytest.raises(pj.ArgumentTypeError, match="1-D integer array"):
        pj.apply(_llama_fn, adapter_ids=np.array([0.5, 1.0]))(p, IDS[:2])


def test_batch_axis_must_lead():
    p = _small()
    with pytest.raises(pj.errors.UnsupportedModuleError, match="not a multiple of 3"):
        pj.apply(_llama_fn, adapter_ids=["a", None, "a"])(p, IDS[:2])


def test_refusals_name_the_method():
    p = _small()
    merged = pj.merge(p)
    with pytest.raises(pj.errors.UnsupportedModuleError, match="merged"):
        pj.apply(_llama_fn, adapter_ids=["a", None])(merged, IDS[:2])
    ln = pj.inject(p, pj.LNTuningConfig(target_modules=["norm"]), key=jax.random.key(1), name="n")
    with pytest.raises(pj.errors.UnsupportedModuleError, match=r"adapter `n` \(ln_tuning\)"):
        pj.apply(_llama_fn, adapter_ids=["a", None])(ln, IDS[:2])
    pt = pj.inject(
        p,
        pj.PromptTuningConfig(num_virtual_tokens=2, token_dim=16),
        key=jax.random.key(2),
        name="pt",
    )
    with pytest.raises(pj.errors.UnsupportedModuleError, match="prompt-learning"):
        pj.apply(_llama_fn, adapter_ids=["a", None])(pt, IDS[:2])


def test_ia3_on_a_biased_layer_refused(mlp):
    p = pj.inject(
        mlp,
        pj.IA3Config(target_modules=["fc1"], feedforward_modules=[]),
        key=jax.random.key(0),
        name="i",
    )
    with pytest.raises(pj.errors.UnsupportedModuleError, match=r"\(ia3\).*bias"):
        pj.apply(lambda q, x: x @ q["params"]["fc1"]["kernel"], adapter_ids=["i"])(
            p, jnp.ones((1, 12))
        )


@pytest.mark.parametrize(
    "cfg",
    [
        pj.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
        pj.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),  # shared projections
        pj.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"]),
        pj.AdaLoraConfig(r=2, target_modules=["q_proj", "v_proj"], total_step=10),
    ],
    ids=lambda c: type(c).__name__,
)
def test_other_methods(cfg):
    p = make_llama(n_layers=1)
    p = pj.inject(p, cfg, key=jax.random.key(0), name="x")
    p = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(1), name="y")
    _assert_rows(_llama_fn, randomize(p, seed=1), IDS[:3], ["x", None, "y"])


def test_quantized_base():
    """A mixed batch on an NF4 base (QLoRA serving): rows equal each adapter alone."""
    p = pj.quantize(make_llama(n_layers=1), block_size=8)
    p = pj.inject(p, pj.LoraConfig(r=2, target_modules=ATTN), key=jax.random.key(0), name="a")
    p = pj.inject(
        p,
        pj.LoraConfig(r=3, use_dora=True, target_modules=["q_proj"]),
        key=jax.random.key(1),
        name="b",
    )
    assert pj.is_quantized(p["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"])
    _assert_rows(_llama_fn, randomize(p, seed=2), IDS[:3], ["b", None, "a"])
