"""`pj.apply`: every adapted output equals the merged model's, and the fast paths are taken.

Each test injects adapters, makes every adapter array non-zero (`randomize`), and compares
``pj.apply(fn)(q, x)`` with ``fn(pj.merge_and_unload(q), x)``. The `fallbacks` fixture counts
how often the interpreter built an effective weight ``W + dW`` (its slow path), so tests can
check that the factored paths are really used, and that odd uses still give exact results.

The methods come from the shared case table (``tests/cases.py``): `test_case_forward_matches
_merged` runs its rows (every method, tree family and weight kind) on a model of their tree
family (`FAMILIES`), and the per-use tests cross the uses with the table's method variants
retargeted to their modules (`configs`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

import peftjax as pj
import peftjax.forward as pjf
from peftjax.methods import DELTA
from tests.cases import BY_NAME, CASES, injected, kind_rows, retarget, spread
from tests.conftest import HIDDEN, make_gpt2, make_nnx, nodes

F32 = jnp.float32

# ------------------------------------------------------------------------------------ helpers


def randomize(q, seed: int = 0, scale: float = 0.3):
    """``q`` with every trainable adapter array perturbed (numpy noise: no per-shape compile)."""
    t, f = pj.partition(q)
    leaves, td = jax.tree_util.tree_flatten(t)
    rng = np.random.default_rng(seed)
    new = []
    for x in leaves:
        a = np.asarray(x)
        new.append(jnp.asarray(a + (scale * rng.normal(size=a.shape)).astype(a.dtype)))
    return pj.combine(jax.tree_util.tree_unflatten(td, new), f)


def maxabs(t) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F32)))) for x in jax.tree_util.tree_leaves(t))


def assert_close(a, b, tol: float = 2e-5):
    """Trees equal up to float32 rounding, relative to the magnitude of ``b``."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        scale = max(1.0, float(jnp.max(jnp.abs(y.astype(F32)))))
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=tol * scale
        )


def assert_differs(a, b, min_diff: float = 1e-3):
    assert maxabs(jax.tree_util.tree_map(lambda u, v: u - v, a, b)) > min_diff


@pytest.fixture
def fallbacks(monkeypatch):
    """A list that grows by one each time `pj.apply` builds an effective weight ``W + dW``."""
    calls: list = []
    orig = pjf._effective

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(pjf, "_effective", counting)
    return calls


def check(fn, q, *args, wrap=None, fallbacks=None, expect_fallback=None, base=None):
    """``pj.apply(fn)(q, ...)`` equals ``fn(merge_and_unload(q), ...)`` (and differs from base)."""
    wrap = wrap or (lambda g: g)
    if fallbacks is not None:
        fallbacks.clear()
    y = wrap(pj.apply(fn))(q, *args)
    n_fb = len(fallbacks) if fallbacks is not None else None
    ym = wrap(fn)(pj.merge_and_unload(q), *args)
    assert_close(y, ym)
    if base is not None:
        assert_differs(ym, wrap(fn)(base, *args))
    if expect_fallback is True:
        assert n_fb, "expected the W + dW fallback"
    elif expect_fallback is False:
        assert n_fb == 0, f"expected the factored fast path, got {n_fb} fallback(s)"
    return y


def normal(shape, seed=0, scale=1.0):
    """Random float32 array from numpy (jax.random would compile a program per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), F32)


@functools.cache
def init(module: nn.Module, shape: tuple, dtype=F32):
    """Params (random, from numpy, shaped by ``module.init``) and an input; cached."""
    if jnp.issubdtype(dtype, jnp.integer):
        x = jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) % 7
    else:
        x = normal(shape, seed=1)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    leaves, td = jax.tree_util.tree_flatten(shapes)
    params = [normal(s.shape, seed=i, scale=0.5) for i, s in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(td, params), x


#: the table's method variants on a dense weight (rows ``<variant>-dense``)
DENSE = [c.name.removesuffix("-dense") for c in kind_rows("dense")]


def configs(targets, ff=None):
    """The table's method variants on other modules: each ``<variant>-dense`` row's config
    (`DENSE`; `randomize` makes every array non-zero) retargeted to ``targets``, feedforward IA3
    (``ia3_feedforward``) to ``ff`` (default: the last target), both IA3 kinds in one adapter
    (``ia3_mixed``); and the copy kinds: LN tuning of the first target, LoRA on it with the
    others as ``modules_to_save``."""
    t = list(targets)
    out = {v: retarget(BY_NAME[f"{v}-dense"].config, t) for v in DENSE}
    if "ia3_feedforward" in out:
        out["ia3_feedforward"] = retarget(out["ia3_feedforward"], list(ff or t[-1:]))
        # output IA3 (its bias too) on every target but ``ff``, feedforward IA3 on ``ff``
        out["ia3_mixed"] = dataclasses.replace(
            out["ia3_output"], feedforward_modules=list(ff or t[-1:])
        )
    out["ln_tuning"] = retarget(BY_NAME["ln_tuning-llama"].config, t[:1])
    m2s = retarget(BY_NAME["lora+modules_to_save-llama"].config, t[:1])
    out["modules_to_save"] = dataclasses.replace(m2s, modules_to_save=t[1:] or t)
    return out


def key(seed: int = 0):
    """An ``rbg`` key: its random ops compile faster on CPU than threefry's (values don't
    matter here, `randomize` replaces them)."""
    return jax.random.key(seed, impl="rbg")


def inject(params, config, layouts=None, seed=0):
    return randomize(pj.inject(params, config, key=key(seed), layouts=layouts), seed)


# ------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="fc1")(x)
        return nn.Dense(16, name="fc2")(nn.relu(h))


DG_LAYOUTS = {"query": pj.Layout("dense", n_in=1), "out": pj.Layout("dense", n_in=2)}


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3), name="conv1")(x)
        return nn.Conv(6, (1, 1), name="conv2")(nn.relu(h))


class EmbedNet(nn.Module):
    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(32, 16, name="embed")
        h = e(ids)
        if not self.tied:
            return h
        return e.attend(nn.Dense(16, name="mid")(h))


def _mlp():
    return (MLP(), *init(MLP(), (5, 16)))


# ------------------------------------------------------------------------------------ the table
# One model per tree family of `tests.conftest.TREES`, using every leaf as a model does (a
# lookup for embeddings, ``x @ kernel`` / a conv for kernels, norm weights as scales), so that
# the rows of the case table run through `pj.apply` against their merged model.


def _llama_fn(p, ids):
    """A small Llama-like model over `conftest.make_llama`'s tree (few ops per layer: every
    case runs it eagerly through `pj.apply`)."""
    m = p["params"]["model"]
    h = m["embed_tokens"]["embedding"][ids]
    for i in sorted(m["layers"], key=int):
        layer = m["layers"][i]
        att, mlp = layer["self_attn"], layer["mlp"]
        a = h * layer["input_layernorm"]["weight"]
        kv = jnp.concatenate([a @ att["k_proj"]["kernel"], a @ att["v_proj"]["kernel"]], -1)
        h = h + jnp.tanh(a @ att["q_proj"]["kernel"] + kv) @ att["o_proj"]["kernel"]
        a = h * layer["post_attention_layernorm"]["weight"]
        gate = jnp.tanh(a @ mlp["gate_proj"]["kernel"])
        h = h + (gate * (a @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    return (h * m["norm"]["weight"]) @ p["params"]["lm_head"]["kernel"]


def _stacked_layer(h, w):
    a = h * w["input_layernorm"]["weight"]
    q = a @ w["self_attn"]["q_proj"]["kernel"] + w["self_attn"]["q_proj"]["bias"]
    v = a @ w["self_attn"]["v_proj"]["kernel"]
    h = h + jnp.tanh(jnp.concatenate([q, v], -1)) @ w["mlp"]["down_proj"]["kernel"]
    return jnp.tanh(h) * w["final_ln"]["scale"] + w["final_ln"]["bias"], None


def _stacked_fn(p, ids):
    """A scan over `conftest.make_stacked`'s stacked layers (each leaf's leading axis); the
    body is a module-level function, so that eager scans of plain trees reuse one compilation."""
    h = p["params"]["embed"]["embedding"][ids]
    return jax.lax.scan(_stacked_layer, h, p["params"]["layers"])[0]


class _Mlp(nn.Module):  # conftest.make_mlp: fc1 (12 -> 20), fc2 (20 -> 12), biased
    @nn.compact
    def __call__(self, x):
        return nn.Dense(12, name="fc2")(nn.relu(nn.Dense(20, name="fc1")(x)))


class _Attn(nn.Module):
    """`conftest.make_dense_general`: DenseGeneral in (``query (16, 2, 4)``, biased) and out
    (``out (2, 4, 16)``, 2 input axes)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        return nn.DenseGeneral(HIDDEN, axis=(-2, -1), use_bias=False, name="out")(jnp.tanh(q))


class _DenseGeneralNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Attn(name="attn")(x)


@functools.cache
def _nnx_graphdef():
    return make_nnx()[0]


def _nnx_fn(state, ids):
    """`conftest.make_nnx`'s model: embed, blocks of q / v Linear and a LayerNorm, a head."""
    m = nnx.merge(_nnx_graphdef(), state)
    h = m.embed(ids)
    for block in m.layers:
        h = block.norm(h + block.q_proj(h))
        v = block.v_proj(h)
        h = h + jnp.concatenate([v, v], -1)
    return m.head(h)


IDS = jnp.array([[1, 5, 31, 0, 7], [2, 2, 9, 30, 4]])

#: tree family -> (function of the params tree, its input)
FAMILIES = {
    "llama": (_llama_fn, IDS),
    "stacked": (_stacked_fn, IDS),
    "mlp": (_Mlp().apply, normal((5, 12), seed=1)),
    "dense_general": (_DenseGeneralNet().apply, normal((2, 5, HIDDEN), seed=1)),
    "conv": (ConvNet().apply, normal((2, 6, 6, 4), seed=1)),
    "nnx": (_nnx_fn, IDS[:, :3]),
}


def _expect_fallback(q) -> bool:
    """Whether `pj.apply` has to build ``W + dW`` for a family's forward: some adapter changes a
    weight through its rules (`DELTA`) without a factored forward for that weight's use (a dot
    for a dense kernel, the conv for a conv kernel, a lookup for an embedding)."""
    for node in nodes(q):
        for name in node.names:
            spec = node.spec(name)
            kind = spec.layout.kind
            has = {"dense": spec.factored, "conv": spec.conv_factored}.get(
                kind, spec.gather_factored
            )
            if spec.role == DELTA and not has:
                return True
    return False


#: the rows run: every method, tree family and weight kind of the table (`spread`). A row costs
#: up to a few seconds of XLA compilations (its adapter shapes are new); a row left out puts a
#: kept method on another tree family or weight kind, or changes values (ranks, inits), and the
#: variants whose rule reads the base output (DoRA, feedforward IA3, ...) run in the per-use
#: tests (`FAST_VARIANTS`)
FORWARD_ROWS = spread(CASES)


@pytest.mark.parametrize("case", FORWARD_ROWS, ids=str)
def test_case_forward_matches_merged(case, fallbacks):
    """Rows of the case table: the unmerged forward equals the merged model's, differs from the
    base model's, and builds ``W + dW`` exactly where the adapter has no factored rule."""
    assert case.tree in FAMILIES, f"no model for tree family {case.tree!r}: add one to FAMILIES"
    fn, x = FAMILIES[case.tree]
    p, q = injected(case)
    q = randomize(q, seed=3)
    check(fn, q, x, fallbacks=fallbacks, expect_fallback=_expect_fallback(q), base=p)


# ------------------------------------------------------------------------------------ linen


@pytest.mark.slow
def test_linen_conv_lora_factored(fallbacks):
    """LoRA on convs runs as PEFT's conv(x, A) then 1x1 B, with no W + dW built; also under
    grad (gradients equal the merged model's) and with strides / dilation."""
    m = ConvNet()
    p, x = init(m, (2, 6, 6, 4))
    q = inject(p, configs(["conv1", "conv2"])["lora"])
    check(m.apply, q, x, fallbacks=fallbacks, expect_fallback=False, base=p)
    t, f = pj.partition(q)
    g = jax.grad(lambda t: jnp.sum(pj.apply(m.apply)(pj.combine(t, f), x) ** 2))(t)
    g_ref = jax.grad(lambda t: jnp.sum(m.apply(pj.merge_and_unload(pj.combine(t, f)), x) ** 2))(t)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    strided = nn.Sequential([nn.Conv(5, (3, 3), strides=2, kernel_dilation=2, padding="VALID")])
    ps = strided.init(jax.random.key(2), jnp.ones((1, 9, 9, 4)))
    qs = inject(ps, pj.LoraConfig(r=2, target_modules=["layers_0"], init_lora_weights=False))
    xs = jax.random.normal(jax.random.key(3), (2, 9, 9, 4))
    check(strided.apply, qs, xs, fallbacks=fallbacks, expect_fallback=False, base=ps)


def test_linen_embed_gather_fast_path(fallbacks):
    m = EmbedNet()
    p, _ = init(m, (2, 4), jnp.int32)
    ids = jnp.array([[1, 5, 31, 0], [2, 2, 7, 9]])
    q = inject(p, pj.LoraConfig(r=3, target_modules=["embed"], init_lora_weights=False))
    check(m.apply, q, ids, fallbacks=fallbacks, expect_fallback=False, base=p)
    emb = lambda p, i: p["params"]["embed"]["embedding"]
    for f in (
        lambda p, i: jnp.take(emb(p, i), i, axis=0),
        lambda p, i: emb(p, i)[i],
        lambda p, i: emb(p, i)[-i],
        lambda p, i: jax.vmap(lambda j: emb(p, i)[j])(i),
        lambda p, i: jnp.take(emb(p, i), i + 20, axis=0, mode="clip"),
    ):
        check(f, q, ids, fallbacks=fallbacks, expect_fallback=False)


def test_linen_embed_odd_gathers_fall_back(fallbacks):
    m = EmbedNet()
    p, _ = init(m, (2, 4), jnp.int32)
    ids = jnp.array([[1, 5, 31, 0], [2, 2, 7, 9]])
    q = inject(p, pj.LoraConfig(r=3, target_modules=["embed"], init_lora_weights=False))
    emb = lambda p: p["params"]["embed"]["embedding"]

    def features_first(p, i):  # a gather whose feature axis is not the last output axis
        dn = jax.lax.GatherDimensionNumbers(
            offset_dims=(0,), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        return jax.lax.gather(emb(p), i[..., None], dn, slice_sizes=(1, 16))

    for f in (
        features_first,
        lambda p, i: emb(p)[:, 3],
        lambda p, i: jnp.take(emb(p), jnp.array([1, 2]), axis=1),
        lambda p, i: jax.lax.dynamic_slice_in_dim(emb(p), i[0, 0], 2, 0),
        lambda p, i: emb(p)[i, :5],
    ):
        check(f, q, ids, fallbacks=fallbacks, expect_fallback=True)
    # one-hot matmul: a dot over the vocab axis is the dense fast path
    check(
        lambda p, i: jax.nn.one_hot(i, 32) @ emb(p),
        q,
        ids,
        fallbacks=fallbacks,
        expect_fallback=False,
    )


@pytest.mark.parametrize("use_dora", [False, True])
def test_linen_embed_tied_head_falls_back(use_dora, fallbacks):
    m = EmbedNet(tied=True)
    p, _ = init(m, (2, 4), jnp.int32)
    ids = jnp.array([[1, 5, 31, 0], [2, 2, 7, 9]])
    cfg = pj.LoraConfig(r=3, target_modules=["embed"], use_dora=use_dora, init_lora_weights=False)
    q = inject(p, cfg)
    check(m.apply, q, ids, fallbacks=fallbacks, expect_fallback=True, base=p)


# ------------------------------------------------------------------------------------ nnx


def test_nnx_model(fallbacks):
    """`conftest.make_nnx`'s model with LoRA on its `nnx.Embed` (a lookup) and a `nnx.Linear`
    and its head as a ``modules_to_save`` copy: the fast paths, nothing built (the table's nnx
    rows run the methods)."""
    state = make_nnx()[1]
    cfg = pj.LoraConfig(r=2, target_modules=["embed", "q_proj"], modules_to_save=["head"])
    q = inject(state, cfg)
    check(_nnx_fn, q, IDS[:, :3], fallbacks=fallbacks, expect_fallback=False, base=state)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(8, name="fc1")(x)
        return nn.BatchNorm(use_running_average=not train, name="bn")(h)


def test_call_conventions(fallbacks):
    """Params as a keyword, static Python arguments, and several outputs (mutable state)."""
    m = BNNet()
    p, x = init(m, (5, 16))
    q = inject(p, configs(["fc1"])["lora"])
    by_kw = lambda x, params, scale: m.apply(params, x) * scale
    y = pj.apply(by_kw)(x, params=q, scale=2.0)
    assert_close(y, by_kw(x, params=pj.merge_and_unload(q), scale=2.0))
    train = lambda p, x: m.apply(p, x, train=True, mutable=["batch_stats"])
    check(train, q, x, fallbacks=fallbacks, expect_fallback=False, base=p)


# ------------------------------------------------------------------------------------ odd uses


@functools.cache
def _plain():
    p = {"lin": {"w": normal((16, 8)), "b": jnp.linspace(-1.0, 1.0, 8)}}
    return p, normal((3, 16), seed=1)


W = lambda p: p["lin"]["w"]


@jax.custom_vjp
def _cvjp_matmul(x, w):
    return x @ w


_cvjp_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


@jax.custom_jvp
def _cjvp_sin_matmul(x, w):
    return jnp.sin(x @ w)


@_cjvp_sin_matmul.defjvp
def _cjvp_rule(primals, tangents):
    x, w = primals
    tx, tw = tangents
    return _cjvp_sin_matmul(x, w), jnp.cos(x @ w) * (tx @ w + x @ tw)


FAST_USES = {
    "matmul": lambda p, x: x @ W(p),
    "matmul_bias": lambda p, x: x @ W(p) + p["lin"]["b"],
    "vector": lambda p, x: x[0] @ W(p),
    "used_twice": lambda p, x: jnp.tanh(x @ W(p)) + (2 * x) @ W(p),
    "einsum_rhs": lambda p, x: jnp.einsum("bi,io->bo", x, W(p)),
    "einsum_lhs": lambda p, x: jnp.einsum("io,bi->ob", W(p), x),
    "inside_jit": lambda p, x: jax.jit(lambda w, x: x @ w)(W(p), x),
    "inside_remat": lambda p, x: jax.checkpoint(lambda w, x: jnp.sin(x @ w))(W(p), x),
    # transposed views of W stay tagged: contracting W's input axis is still the fast path
    "lhs_of_dot": lambda p, x: W(p).T @ x.T,
    "einsum_transpose": lambda p, x: jnp.einsum("oi,bi->bo", W(p).T, x),
}

FALLBACK_USES = {
    "transposed": lambda p, x: (x @ W(p)) @ W(p).T,
    "sliced": lambda p, x: x @ W(p)[:, :3],
    "returned": lambda p, x: W(p),
    "returned_from_jit": lambda p, x: jax.jit(lambda w: w.astype(F32))(W(p)),
    "reduced": lambda p, x: x @ W(p) + W(p).sum(),
    "cond": lambda p, x: jax.lax.cond(x.sum() > 0, lambda w: x @ w, lambda w: -(x @ w), W(p)),
    "while": lambda p, x: jax.lax.while_loop(
        lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ W(p) @ W(p).T), c[1] + 1), (x, 0)
    )[0],
    "custom_vjp": lambda p, x: _cvjp_matmul(x, W(p)),
    "custom_jvp": lambda p, x: _cjvp_sin_matmul(x, W(p)),
    "einsum_batched": lambda p, x: jnp.einsum("bi,bio->bo", x, jnp.broadcast_to(W(p), (3, 16, 8))),
    "einsum_out_contracted": lambda p, x: jnp.einsum("io,jo->ij", W(p), W(p)),
}


def _forward_kind(config) -> tuple:
    """What the interpreter sees of an adapter on `_plain`'s weight: the method, whether its rule
    reads the base output, whether it may be fused (from an abstract inject: no compilation)."""
    with warnings.catch_warnings():  # a variant's own notes on `lin` (OFT adjusting its `r`)
        warnings.simplefilter("ignore", UserWarning)
        q = jax.eval_shape(lambda p: pj.inject(p, config, key=jax.random.key(0)), _plain()[0])
    spec = nodes(q)[0].spec("default")
    return spec.method, spec.needs_base_output, spec.fusable(False)


def _per_use_variants(variants) -> list[str]:
    """The variants the per-use tests cross with: the first (LoRA: also fused when nobody
    differentiates) and, of each `_forward_kind` whose rule reads the base output, the first
    one: the interpreter hands such a rule ``W`` as the use sees it (through transposes, casts,
    jit / remat boundaries). Any other rule only gets the use's 2-D input and output, the same
    for every use, and runs on the table's rows in `test_case_forward_matches_merged`."""
    cfgs, seen = configs(["lin"]), {}
    for v in variants:
        seen.setdefault(_forward_kind(cfgs[v]), v)
    return [variants[0]] + [v for k, v in seen.items() if k[1] and v != variants[0]]


FAST_VARIANTS = _per_use_variants(DENSE)


@pytest.mark.parametrize("method", FAST_VARIANTS)
@pytest.mark.parametrize("use", list(FAST_USES))
def test_plain_function_fast_uses(method, use, fallbacks):
    p, x = _plain()
    q = inject(p, configs(["lin"])[method])
    check(FAST_USES[use], q, x, fallbacks=fallbacks, expect_fallback=False, base=p)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("use", list(FALLBACK_USES))
def test_plain_function_odd_uses_fall_back_exactly(method, use, fallbacks):
    p, x = _plain()
    q = inject(p, configs(["lin"])[method])
    check(FALLBACK_USES[use], q, x, fallbacks=fallbacks, expect_fallback=True, base=p)


@pytest.mark.parametrize("method", ["lora", "dora", "lokr_decomposed"])
def test_bf16_weight_cast_before_dot(method, fallbacks):
    """``x @ w.astype(f32)``: the fast path sees through the cast and adds the float32 delta."""
    p, x = _plain()
    pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
    qb = inject(pb, configs(["lin"])[method])
    fallbacks.clear()
    y = pj.apply(lambda p, x: x @ W(p).astype(F32))(qb, x)
    assert not fallbacks and y.dtype == F32
    # reference: the same adapters on the bf16-rounded base, merged in float32
    q32 = jax.tree_util.tree_map(lambda a: a.astype(F32), qb)
    assert_close(y, x @ W(pj.merge_and_unload(q32)))
    # a bf16 dot stays bf16
    yb = pj.apply(lambda p, x: x.astype(jnp.bfloat16) @ W(p))(qb, x)
    assert yb.dtype == jnp.bfloat16
    assert_close(yb.astype(F32), (x @ W(pj.merge_and_unload(q32))), tol=3e-2)
    # transpose -> cast -> transpose is seen through too: fast path, float32 delta
    fallbacks.clear()
    y2 = pj.apply(lambda p, x: x @ W(p).T.astype(F32).T)(qb, x)
    assert not fallbacks
    assert_close(y2, x @ W(pj.merge_and_unload(q32)))


@pytest.mark.parametrize("method", ["lora"])
def test_dense_general_einsum_orders(method, fallbacks):
    p = {"query": {"kernel": normal((16, 2, 4))}, "out": {"kernel": normal((2, 4, 16), 1)}}
    x = normal((3, 5, 16), 2)
    h = normal((3, 5, 2, 4), 3)
    q = inject(p, configs(["query", "out"], ff=["out"])[method], DG_LAYOUTS)
    qk, ok = (lambda p: p["query"]["kernel"]), (lambda p: p["out"]["kernel"])
    fast = [
        (lambda p, x: jnp.einsum("btd,dhk->bthk", x, qk(p)), x),
        (lambda p, x: jnp.einsum("dhk,btd->hbkt", qk(p), x), x),
        (lambda p, h: jnp.einsum("bthk,hko->bto", h, ok(p)), h),
        (lambda p, h: jnp.einsum("btkh,hko->bto", jnp.swapaxes(h, -1, -2), ok(p)), h),
        (lambda p, h: jnp.einsum("hko,tbkh->otb", ok(p), jnp.transpose(h, (1, 0, 3, 2))), h),
    ]
    for f, a in fast:
        check(f, q, a, fallbacks=fallbacks, expect_fallback=False, base=p)
    # only one of the two input axes contracted: not a use of the matrix view
    check(
        lambda p, h: jnp.einsum("bthk,hko->btko", h, ok(p)),
        q,
        h,
        fallbacks=fallbacks,
        expect_fallback=True,
    )


# ------------------------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def hf_llama():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    fm = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(np.float32)),
        fm.params_shape_tree,
    )
    ids = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
    return fm, params, ids


@pytest.mark.parametrize(
    "config",
    [
        pj.LoraConfig(
            r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        ),
        pytest.param(  # IA3 through FlaxLlama with -m slow
            pj.IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["lora", "ia3"],
)
def test_transformers_flax_llama(hf_llama, config, fallbacks):
    fm, params, ids = hf_llama
    f = lambda p, ids: fm(ids, params=p).logits
    q = inject(params, config, seed=1)
    check(f, q, ids, wrap=jax.jit, fallbacks=fallbacks, expect_fallback=False, base=params)


def test_transformers_flax_gpt2_transposed_kernels_exact(fallbacks):
    """GPT-2's Flax Conv1D keeps ``(out, in)`` kernels: without ``transposed=True`` the adapter
    would have the wrong orientation (`pj.apply` refuses); with it, and with the tied ``wte``
    (whose lm_head use falls back), the result is exact."""
    gm, params = make_gpt2(n_embd=32, n_head=4)
    ids = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    cfg = pj.LoraConfig(r=2, target_modules=["c_attn", "wte"], init_lora_weights=False)
    f = lambda p, ids: gm(ids, params=p).logits
    with pytest.raises(pj.LayoutError, match="c_attn"):
        jax.jit(pj.apply(f))(inject(params, cfg, seed=1), ids)
    q = inject(params, cfg, {"c_attn": pj.Layout("dense", transposed=True)}, seed=1)
    check(f, q, ids, wrap=jax.jit, fallbacks=fallbacks, expect_fallback=True, base=params)


# ------------------------------------------------------------------------------------ transforms


def _dora_reference_weights(q):
    """Plain tree of DoRA-merged weights with the norm's gradient stopped (as PEFT)."""

    def fix(n):
        if not isinstance(n, pj.Adapted):
            return n
        spec, a = n.spec("default"), n.arrays["default"]
        w = n.base + spec.scaling[0] * a["lora_A"] @ a["lora_B"]
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
        return w * (a["lora_magnitude_vector"] / norm)[None, :]

    return jax.tree_util.tree_map(fix, q, is_leaf=lambda n: isinstance(n, pj.Adapted))


@pytest.mark.parametrize(  # LoRA and DoRA by default, the others with -m slow
    "method",
    ["lora", "dora"]
    + [
        pytest.param(m, marks=pytest.mark.slow)
        for m in ("lokr_decomposed", "ia3_mixed", "ln_tuning")
    ],
)
def test_grad_matches_merged_formulation(method):
    m, p, x = _mlp()
    q = inject(p, configs(["fc1", "fc2"])[method])
    t, f = pj.partition(q)
    loss = lambda t: jnp.sum(jnp.sin(pj.apply(m.apply)(pj.combine(t, f), x)))
    if method == "dora":
        ref = lambda t: jnp.sum(jnp.sin(m.apply(_dora_reference_weights(pj.combine(t, f)), x)))
    else:
        ref = lambda t: jnp.sum(jnp.sin(m.apply(pj.merge_and_unload(pj.combine(t, f)), x)))
    g = jax.jit(jax.grad(loss))(t)
    g_ref = jax.grad(ref)(t)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(t)
    scale = maxabs(g_ref)
    assert scale > 0
    assert_close(g, g_ref, tol=2e-5 * scale)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_jit_vmap_checkpoint(method):
    m, p, x = _mlp()
    q = inject(p, configs(["fc1", "fc2"])[method])
    merged = pj.merge_and_unload(q)
    xs = jnp.stack([x, 2 * x, -x])
    ym = jax.jit(jax.vmap(m.apply, in_axes=(None, 0)))(merged, xs)
    vm = lambda f: jax.vmap(f, in_axes=(None, 0))
    assert_close(jax.jit(vm(pj.apply(m.apply)))(q, xs), ym)
    assert_close(jax.jit(pj.apply(vm(m.apply)))(q, xs), ym)
    assert_close(jax.jit(jax.checkpoint(pj.apply(m.apply)))(q, x), ym[0])
    assert_close(jax.jit(pj.apply(jax.checkpoint(m.apply)))(q, x), ym[0])
    assert_close(jax.jit(pj.apply(nn.remat(MLP)().apply))(q, x), ym[0])
    # gradients through a remat inside the adapted function
    t, f = pj.partition(q)
    loss = lambda g: lambda t: jnp.sum(pj.apply(g)(pj.combine(t, f), x) ** 2)
    g_remat = jax.jit(jax.grad(loss(jax.checkpoint(m.apply))))(t)
    assert_close(g_remat, jax.jit(jax.grad(loss(m.apply)))(t), tol=1e-4)


STACK_L = 3


@functools.cache
def _stacked():
    w = normal((STACK_L, 8, 8), scale=0.5)
    return {"layers": {"mlp": {"kernel": w}}}, normal((4, 8), seed=1)


def _scan_fn(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["mlp"]["kernel"])[0]


# LoRA and LoKr scan over stacked weights in the table's stacked rows
@pytest.mark.parametrize("method", ["dora"])
def test_lax_scan_over_stacked_weights(method, fallbacks):
    p, x = _stacked()
    q = inject(p, configs(["mlp"])[method], {"mlp": pj.Layout("dense", stack=1)})
    check(_scan_fn, q, x, fallbacks=fallbacks, expect_fallback=False, base=p)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_stacked_weights_other_uses(method, fallbacks):
    p, x = _stacked()
    q = inject(p, configs(["mlp"])[method], {"mlp": pj.Layout("dense", stack=1)})
    rev = lambda p, x: jax.lax.scan(
        lambda h, w: (jnp.tanh(h @ w), h.sum()), x, p["layers"]["mlp"]["kernel"], reverse=True
    )
    check(rev, q, x, fallbacks=fallbacks, expect_fallback=False)
    # a stacked weight indexed / contracted outside a scan: fallback, exact
    check(
        lambda p, x: x @ p["layers"]["mlp"]["kernel"][1],
        q,
        x,
        fallbacks=fallbacks,
        expect_fallback=True,
    )
    check(
        lambda p, x: jnp.einsum("bi,lio->lbo", x, p["layers"]["mlp"]["kernel"]),
        q,
        x,
        fallbacks=fallbacks,
        expect_fallback=True,
    )
    fori = lambda p, x: jax.lax.fori_loop(
        0, STACK_L, lambda i, h: jnp.tanh(h @ p["layers"]["mlp"]["kernel"][i]), x
    )
    check(fori, q, x, fallbacks=fallbacks, expect_fallback=True)


def test_nested_scans_two_stack_axes(fallbacks):
    p = {"blocks": {"w": normal((2, 3, 8, 8), scale=0.4)}}
    x = normal((4, 8), seed=1)
    q = inject(p, configs(["blocks"])["lora"], pj.Layout("dense", stack=2))

    def nested(p, x):
        def outer(h, ws):
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)[0], None

        return jax.lax.scan(outer, x, p["blocks"]["w"])[0]

    check(nested, q, x, fallbacks=fallbacks, expect_fallback=False, base=p)
    # one stack axis consumed by the scan, the other indexed: partial-stack fallback
    part = lambda p, x: jax.lax.scan(
        lambda h, ws: (jnp.tanh(h @ ws[1]), None), x, p["blocks"]["w"]
    )[0]
    check(part, q, x, fallbacks=fallbacks, expect_fallback=True)


def test_stacked_layers_to_transform_leaves_layers_at_base():
    p, x = _stacked()
    cfg = pj.LoraConfig(
        r=2, target_modules=["mlp"], layers_to_transform=[1], init_lora_weights=False
    )
    q = inject(p, cfg, {"mlp": pj.Layout("dense", stack=1)})

    def per_layer(p, x):  # each layer's output on the same input
        return jax.lax.scan(lambda h, w: (h, h @ w), x, p["layers"]["mlp"]["kernel"])[1]

    ys, yb = pj.apply(per_layer)(q, x), per_layer(p, x)
    assert jnp.array_equal(ys[0], yb[0]) and jnp.array_equal(ys[2], yb[2])
    assert_differs(ys[1], yb[1])
    merged = pj.merge_and_unload(q)
    assert_close(ys, per_layer(merged, x))
    w, w0 = merged["layers"]["mlp"]["kernel"], p["layers"]["mlp"]["kernel"]
    assert jnp.array_equal(w[0], w0[0]) and jnp.array_equal(w[2], w0[2])


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        a = nn.Dense(8, name="fc1")(h)
        h = h + nn.Dense(8, name="fc2")(jax.nn.gelu(a))
        return nn.LayerNorm(name="ln")(h), None


class ScannedModel(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True}, length=STACK_L
        )
        h, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(h)


@pytest.mark.parametrize(
    "method,remat",  # plain LoRA in the default run, the variants with -m slow
    [("lora", False)]
    + [
        pytest.param(m, r, marks=pytest.mark.slow)
        for m, r in [("ia3_mixed", 0), ("ln_tuning", 0), ("lora_ltt", 0), ("lora", 1)]
    ],
)
def test_linen_nn_scan(method, remat, fallbacks):
    m = ScannedModel(remat=remat)
    p, x = init(m, (4, 8))
    if method == "ln_tuning":
        cfg = pj.LNTuningConfig(target_modules=["ln"])
    elif method == "lora_ltt":
        cfg = pj.LoraConfig(
            r=2, target_modules=["fc1", "fc2"], layers_to_transform=[0, 2], init_lora_weights=False
        )
    else:
        cfg = configs(["fc1", "fc2"])[method]
    q = inject(p, cfg, {r"layers\..*": pj.Layout("dense", stack=1)})
    check(m.apply, q, x, fallbacks=fallbacks, expect_fallback=False, base=p)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.fc(h))


@pytest.mark.parametrize("method", ["lora"])
def test_nnx_vmap_created_layers_run_with_nnx_scan(method, fallbacks):
    @nnx.split_rngs(splits=STACK_L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return NnxBlock(rngs)

    graphdef, state = nnx.split(make(nnx.Rngs(0)))

    def fwd(s, x):
        blocks = nnx.merge(graphdef, s)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, blk):
            return blk(h)

        return run(x, blocks)

    x = normal((4, 8), seed=1)
    q = inject(state, configs(["fc"])[method], pj.Layout("dense", stack=1))
    check(fwd, q, x, fallbacks=fallbacks, expect_fallback=False, base=state)
    check(fwd, q, x, wrap=jax.jit)


# ------------------------------------------------------------------------------------ states


def test_merged_tree_inactive_and_two_adapters():
    m, p, x = _mlp()
    cfgs = configs(["fc1", "fc2"])
    q = pj.inject(p, cfgs["lora"], key=key(0), name="a")
    q = pj.inject(q, cfgs["lokr_decomposed"], key=key(1), name="b")
    q = randomize(pj.set_active(q, ["a", "b"]))
    y_base = m.apply(p, x)
    # two active adapters on the same modules add
    y = pj.apply(m.apply)(q, x)
    ya = pj.apply(m.apply)(pj.set_active(q, "a"), x)
    yb = pj.apply(m.apply)(pj.set_active(q, "b"), x)
    assert_close(y, m.apply(pj.merge_and_unload(q), x))
    assert_differs(y, ya)
    assert_differs(y, yb)
    lin = lambda p, x: x @ p["params"]["fc1"]["kernel"]
    assert_close(
        pj.apply(lin)(q, x) - lin(p, x),
        (pj.apply(lin)(pj.set_active(q, "a"), x) - lin(p, x))
        + (pj.apply(lin)(pj.set_active(q, "b"), x) - lin(p, x)),
    )
    # merged: nothing added twice, fully or partly merged
    assert_close(pj.apply(m.apply)(pj.merge(q), x), m.apply(pj.merge_and_unload(q), x))
    assert_close(pj.apply(m.apply)(pj.merge(q, "a"), x), y)
    # inactive: exactly the base model
    assert jnp.array_equal(pj.apply(m.apply)(pj.set_active(q, None), x), y_base)
    assert jnp.array_equal(pj.apply(m.apply)(pj.set_active(q, []), x), y_base)


@pytest.mark.parametrize("first", ["lora", "dora", "ia3_mixed"])
@pytest.mark.parametrize("order", ["copy_last", "copy_first"])
def test_copy_adapter_with_another_on_the_same_module(first, order):
    """LN tuning / modules_to_save and an additive adapter both active on one module: the
    forward applies them in activation order, as `merge` folds them."""
    m, p, x = _mlp()
    q = pj.inject(p, configs(["fc1", "fc2"])[first], key=key(0), name="add")
    q = pj.inject(q, pj.LNTuningConfig(target_modules=["fc2"]), key=key(1), name="ln")
    names = ["add", "ln"] if order == "copy_last" else ["ln", "add"]
    q = randomize(pj.set_active(q, names))
    check(m.apply, q, x, base=p)


# ------------------------------------------------------------------------------------ cost


class WideMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, name="fc1")(x)
        return nn.Dense(128, name="fc2")(nn.relu(h))


def _flops(f, *args) -> float:
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _wide():
    return (WideMLP(), *init(WideMLP(), (64, 128)))


def test_zero_cost_when_nothing_to_do():
    m, p, x = _wide()
    base = _flops(m.apply, p, x)
    q = inject(p, configs(["fc1", "fc2"])["lora"])
    assert _flops(pj.apply(m.apply), p, x) == base
    assert _flops(pj.apply(m.apply), pj.set_active(q, None), x) == base
    assert _flops(pj.apply(m.apply), pj.merge(q), x) == base
    ql = inject(p, configs(["fc1", "fc2"])["lokr_decomposed"])
    assert _flops(pj.apply(m.apply), pj.merge(ql), x) == base


def test_lora_forward_flops_are_factored():
    m, p, x = _wide()
    T, r = x.shape[0], 4
    base = _flops(m.apply, p, x)
    q = inject(p, pj.LoraConfig(r=r, target_modules=["fc1", "fc2"], init_lora_weights=False))
    extra = _flops(pj.apply(m.apply), q, x) - base
    analytic = 2 * T * r * (128 + 256) * 2
    assert analytic / 2 <= extra <= 2 * analytic, (extra, analytic)
    # building W + dW would cost at least 2 * in * out * r per matrix, more than factored here
    built = (
        _flops(pj.apply(lambda p, x: m.apply(p, x) + 0 * p["params"]["fc1"]["kernel"].sum()), q, x)
        - base
    )
    assert built > extra
    # LoKr: Kronecker identity, far below a dense delta matmul 2 * T * in * out per matrix
    ql = inject(p, configs(["fc1", "fc2"])["lokr_decomposed"])
    assert _flops(pj.apply(m.apply), ql, x) - base < 2 * T * 128 * 256


def _eqn_out_shapes(jaxpr, acc):
    for e in jaxpr.eqns:
        acc.extend((e.primitive.name, tuple(v.aval.shape)) for v in e.outvars)
        for sub in jcore.jaxprs_in_params(e.params):
            _eqn_out_shapes(sub, acc)
    return acc


@pytest.mark.parametrize("method", ["lora", "lokr_decomposed"])
def test_lora_grad_builds_no_weight_sized_array(method):
    """No equation of the training jaxpr produces an array shaped like a frozen kernel: no
    ``W + dW`` and no full-size weight gradient."""
    m, p, x = _wide()
    q = inject(p, configs(["fc1", "fc2"])[method])
    t, f = pj.partition(q)
    loss = lambda t: jnp.sum(pj.apply(m.apply)(pj.combine(t, f), x) ** 2)
    shapes = _eqn_out_shapes(jax.make_jaxpr(jax.value_and_grad(loss))(t).jaxpr, [])
    assert shapes
    big = [s for s in shapes if s[1] in ((128, 256), (256, 128))]
    assert not big, big[:5]


# ------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize(
    "method,kw",
    [  # LoRA's and LoKr's (rank and module dropout) by default, DoRA's and LoHa's with -m slow
        ("lora", {"lora_dropout": 0.5}),
        pytest.param("dora", {"lora_dropout": 0.5}, marks=pytest.mark.slow),
        pytest.param("loha", {"rank_dropout": 0.5}, marks=pytest.mark.slow),
        ("lokr_decomposed", {"rank_dropout": 0.5, "module_dropout": 0.5}),
    ],
)
def test_dropout(method, kw):
    m, p, x = _mlp()
    cfg = configs(["fc1", "fc2"])[method]
    q = inject(p, dataclasses.replace(cfg, **kw))
    q0 = inject(p, cfg)  # same arrays, no dropout
    y_eval = pj.apply(m.apply)(q, x)
    assert_close(y_eval, pj.apply(m.apply)(q0, x))
    assert_close(y_eval, m.apply(pj.merge_and_unload(q), x))
    train = jax.jit(lambda q, x, k: pj.apply(m.apply, rng=k)(q, x))
    ys = [train(q, x, key(k)) for k in range(6)]
    assert any(maxabs(y - y_eval) > 1e-3 for y in ys)
    assert jnp.array_equal(ys[0], train(q, x, key(0)))  # deterministic given the key
    assert not all(jnp.array_equal(ys[0], y) for y in ys[1:])


def test_lora_dropout_is_unbiased_and_only_on_the_adapter_input():
    p, x = _plain()
    q = inject(
        p, pj.LoraConfig(r=3, target_modules=["lin"], lora_dropout=0.5, init_lora_weights=False)
    )
    f = lambda p, x: x @ W(p)
    keys = jax.random.split(key(0), 4000)
    ys = jax.jit(jax.vmap(lambda k: pj.apply(f, rng=k)(q, x)))(keys)
    y_eval = pj.apply(f)(q, x)
    assert_close(ys.mean(0), y_eval, tol=0.05)
    # the base term is never dropped: y - x W is in the span of B's rows
    node = q["lin"]["w"]
    b = node.arrays["default"]["lora_B"]
    resid = ys[:8] - x @ node.base
    coef, *_ = np.linalg.lstsq(np.asarray(b.T), np.asarray(resid.reshape(-1, 8).T), rcond=None)
    assert_close(jnp.asarray((b.T @ coef).T).reshape(resid.shape), resid, tol=1e-4)


def test_non_array_outputs_pass_through_with_active_adapters():
    q = pj.inject(
        {"lin": {"w": jnp.eye(3)}},
        pj.LoraConfig(r=1, target_modules=["lin"], init_lora_weights=False),
        key=jax.random.key(0),
    )
    x = jnp.ones((2, 3))
    fn = lambda p, x: (x @ p["lin"]["w"], "tag", 3, {"x": x})
    y, tag, n, d = pj.apply(fn)(q, x)
    assert (tag, n) == ("tag", 3)
    np.testing.assert_allclose(y, fn(pj.merge_and_unload(q), x)[0], rtol=1e-6)
    np.testing.assert_array_equal(d["x"], x)
    out = jax.jit(pj.apply(lambda p, x: {"y": x @ p["lin"]["w"], "n": None}))(q, x)
    assert out["n"] is None and out["y"].shape == (2, 3)


# the (out, in) view matters to the rules that read the base output (DoRA, feedforward IA3);
# the others get the use's 2-D input and output only
@pytest.mark.parametrize("method", ["lora", "dora", "ia3_feedforward"])
def test_transposed_layout_out_in_kernels_fast_and_exact(method, monkeypatch):
    """(out, in) kernels (Flax GPT-2) with Layout(transposed=True): x @ W.T and W @ x.T take the
    factored path, a sliced use falls back, and all equal the merged model."""
    calls = []
    orig = pjf._effective
    monkeypatch.setattr(pjf, "_effective", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    p = {"fc": {"kernel": normal((6, 4))}}
    q = inject(p, configs(["fc"])[method], {"fc": pj.Layout("dense", transposed=True)})
    x = normal((3, 4), seed=1)
    m = pj.merge_and_unload(q)
    for f in (lambda p, x: x @ p["fc"]["kernel"].T, lambda p, x: (p["fc"]["kernel"] @ x.T).T):
        np.testing.assert_allclose(pj.apply(f)(q, x), f(m, x), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(f(m, x) - f(p, x)).max()) > 1e-2
    assert not calls
    g = lambda p, x: x[:, :3] @ p["fc"]["kernel"].T[:3]  # sliced transposed view: fallback
    np.testing.assert_allclose(pj.apply(g)(q, x), g(m, x), rtol=1e-5, atol=1e-5)
    assert calls


def test_flax_gpt2_conv1d_kernels_take_the_fast_path(monkeypatch):
    calls = []
    orig = pjf._effective
    monkeypatch.setattr(pjf, "_effective", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    fm, fparams = make_gpt2(n_embd=32, n_head=4)
    q = pj.inject(
        fparams,
        pj.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
        key=jax.random.key(0),
        layouts=pj.Layout("dense", transposed=True),
    )
    ids = jnp.arange(16).reshape(2, 8)
    run = lambda p, ids: fm(ids, params=p).logits
    merged = jax.jit(run)(pj.merge_and_unload(q), ids)
    np.testing.assert_allclose(jax.jit(pj.apply(run))(q, ids), merged, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(merged - jax.jit(run)(fparams, ids)).max()) > 1e-2
    assert not calls
