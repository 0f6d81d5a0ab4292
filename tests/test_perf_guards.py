"""Deterministic performance guards (no timing): what XLA compiles for a training step.

For small models of each family the benchmark matrix covers (a residual MLP on 3-D
activations, a Llama-style linen model, the same with ``nn.scan``-stacked layers, an nnx model
and transformers' Flax GPT-2 with its ``(out, in)`` kernels), each method's step
(``jax.grad`` w.r.t. ``pj.partition``'s trainable part through ``pj.apply``) is compiled next
to the model's floor (forward + input gradient: the grad w.r.t. a scale on the input
activations), and:

* its XLA FLOPs stay within the floor plus the method's analytic adapter work (`analytic`);
* its HLO holds no more ops of the size of an adapted weight (``in x out``) than the floor's:
  no ``W + dW``, no full-size transposes or copies of frozen kernels per step (DoRA's norm of
  ``W + dW`` included: it is computed without the sum). LoHa, which builds its delta by
  definition, is exempt from this check only.

Sizes are chosen so that no activation (``tokens x features``) has the size of a weight.
benchmarks/matrix.py measures the same rows at realistic sizes, with times.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax as pj
from peftjax._tree import walk
from tests.conftest import make_gpt2

B, T, D, H, R = 2, 11, 24, 40, 4  # tokens 22; weights 24x24, 24x40, 40x24
HEADS = 2


# ------------------------------------------------------------------------------------ models


class MLPBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(H, name="up")(x)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = MLPBlock(name=f"block_{i}")(x)
        return x


class Block(nn.Module):
    """Llama-style: q/k/v/o attention and a gated MLP, on ``(batch, seq, D)``."""

    @nn.compact
    def __call__(self, x, _=None):
        b, t, d = x.shape
        dense = lambda n, f: nn.Dense(f, use_bias=False, name=n)  # noqa: E731
        q = dense("q_proj", D)(x).reshape(b, t, HEADS, -1)
        k = dense("k_proj", D)(x).reshape(b, t, HEADS, -1)
        v = dense("v_proj", D)(x).reshape(b, t, HEADS, -1)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS), -1)
        x = x + dense("o_proj", D)(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
        h = jax.nn.silu(dense("gate_proj", H)(x)) * dense("up_proj", H)(x)
        return x + dense("down_proj", D)(h), None


class Llama(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scanned:
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
            )
            return stack(name="layers")(x, None)[0]
        for i in range(2):
            x = Block(name=f"layers_{i}")(x)[0]
        return x


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(D, H, rngs=rngs)
        self.down_proj = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        x = x + jax.nn.sigmoid(self.q_proj(x)) * self.v_proj(x)
        return x + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(2)])

    def __call__(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def _x(seed=0, d=D):
    return jax.random.normal(jax.random.key(seed), (B, T, d))


def linen_case(module):
    x = _x()
    params = module.init(jax.random.key(1), x)
    return params, lambda p, x: module.apply(p, x), x, None


def nnx_case():
    graphdef, state = nnx.split(NnxModel(nnx.Rngs(0)))
    return state, lambda st, x: nnx.merge(graphdef, st)(x), _x(), None


def gpt2_case():
    gm, params = make_gpt2(n_embd=24, n_head=2, n_layer=1, vocab=72)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 72, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def fwd(p, s):  # ``s`` scales the token embedding table: the floor's input gradient
        p = {
            **p,
            "transformer": {
                **p["transformer"],
                "wte": {"embedding": p["transformer"]["wte"]["embedding"] * s},
            },
        }
        return gm.module.apply({"params": p}, ids, jnp.ones_like(ids), pos, return_dict=False)[0]

    layouts = {name: pj.Layout("dense", transposed=True) for name in ("c_attn", "c_proj", "c_fc")}
    return params, fwd, jnp.float32(1.0), layouts


def scanned_case():
    params, fwd, x, _ = linen_case(Llama(scanned=True))
    return params, fwd, x, pj.Layout("dense", stack=1)


CASES = {
    "mlp": lambda: linen_case(MLP()),
    "llama": lambda: linen_case(Llama()),
    "scanned": scanned_case,
    "nnx": nnx_case,
    "gpt2": gpt2_case,
}

CONFIGS = {
    "lora": pj.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"),
    "dora": pj.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", use_dora=True),
    "lokr": pj.LoKrConfig(r=R, alpha=2 * R, target_modules="all-linear"),
    "loha": pj.LoHaConfig(r=R, alpha=2 * R, target_modules="all-linear"),
    "ia3": pj.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]),
}

ROWS = [(m, "lora") for m in CASES] + [("llama", m) for m in CONFIGS if m != "lora"]
# the slowest compiles run with `-m slow` (CI runs both): transformers' GPT-2, the scanned
# model, and the llama rows of the methods whose guard is the same dot-rule as LoRA's
SLOW_ROWS = {
    ("gpt2", "lora"),
    ("scanned", "lora"),
    ("nnx", "lora"),
    ("llama", "lokr"),
    ("llama", "loha"),
    ("llama", "dora"),
}
EXEMPT_FROM_HLO = {"loha"}


# ------------------------------------------------------------------------------------ analysis


def analytic(params, tokens: int) -> float:
    """Analytic FLOPs that the adapters add to a training step (forward + backward)."""
    total = 0.0
    for leaf in walk(params)[0]:
        node = leaf.value
        if not isinstance(node, pj.Adapted):
            continue
        for name, spec in node.specs:
            if spec.method == "ia3":
                n = spec.in_out[0] if spec.feedforward else spec.in_out[1]
                total += spec.n_layers * 6 * tokens * n
                continue
            if spec.method not in ("lora", "lokr", "loha"):
                continue
            i, o = spec.in_out
            L, r = spec.n_layers, spec.r
            if spec.method == "lora":
                f = 6 * tokens * r * (i + o) + 6 * tokens * r
                if spec.use_dora:  # the norm of W + dW per step (no backward), base rescale
                    f += 2 * i * o * r + 4 * i * o + 12 * tokens * o
            elif spec.method == "lokr":
                arrays = node.arrays[name]
                a, b, c, d = spec.dims
                f = 6 * tokens * (c * d * b + c * a * b) + 6 * tokens * o
                if "lokr_w2_a" in arrays:
                    f += 6 * d * r * b
                if "lokr_w1_a" in arrays:
                    f += 6 * c * r * a
            else:  # LoHa builds its delta: two rank-r products, then a dense matmul with it
                f = 3 * (2 * 2 * i * o * r + 2 * i * o) + 6 * tokens * i * o
            total += L * f
    return total


_OP = re.compile(r"= [a-z0-9]+\[([\d,]*)\]\{[^}]*\} ([a-z\-]+)\(")
_FREE = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}


def weight_sized_ops(hlo: str, sizes: set[int]) -> list[str]:
    """HLO instructions (not parameters or bitcasts) whose output has a weight's size."""
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m or m.group(2) in _FREE:
            continue
        n = math.prod(int(s) for s in m.group(1).split(",")) if m.group(1) else 1
        if n in sizes:
            out.append(line.strip()[:160])
    return out


def activation_copies(hlo: str, params, tokens: int) -> list[str]:
    """``copy`` / ``transpose`` ops that move an adapted layer's input or output activations
    (``tokens x F`` elements, ``F`` its ``in`` or ``out``) into a feature-major layout: the
    relayout XLA:CPU makes for ``x^T @ g`` on 3-D activations (``(F, B, T)``)."""
    feats = set()
    for leaf in walk(params)[0]:
        if isinstance(leaf.value, pj.Adapted):
            feats |= set(leaf.value.specs[0][1].in_out)
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= [a-z0-9]+\[([\d,]+)\]\{[^}]*\} (copy|transpose)\(", line)
        if not m:
            continue
        dims = [int(s) for s in m.group(1).split(",") if int(s) != 1]
        if dims and dims[0] in feats and math.prod(dims) == tokens * dims[0]:
            out.append(line.strip()[:160])
    return out


def weight_sizes(params) -> set[int]:
    sizes = set()
    for leaf in walk(params)[0]:
        if isinstance(leaf.value, pj.Adapted):
            spec = leaf.value.specs[0][1]
            i, o = spec.in_out
            sizes.add(i * o)
    return sizes


@functools.cache
def _case_and_floor(case: str):
    """A case's model and its compiled floor, built once for all of its rows."""
    params, fwd, x, layouts = CASES[case]()
    y = jnp.zeros_like(fwd(params, x))

    def floor(s):
        return jnp.mean((fwd(params, x * s) - y) ** 2)

    c_floor = jax.jit(jax.grad(floor)).lower(jnp.float32(1.0)).compile()
    return params, fwd, x, layouts, y, c_floor


def compiled_pair(case: str, method: str):
    params, fwd, x, layouts, y, c_floor = _case_and_floor(case)
    adapted = pj.inject(params, CONFIGS[method], key=jax.random.key(2), layouts=layouts)
    t, f = pj.partition(adapted)

    def step_loss(t):
        return jnp.mean((pj.apply(fwd)(pj.combine(t, f), x) - y) ** 2)

    c_step = jax.jit(jax.grad(step_loss)).lower(t).compile()
    return adapted, c_floor, c_step


def _flops(c) -> float:
    ca = c.cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


@pytest.mark.parametrize(
    "case,method",
    [
        pytest.param(c, m, id=f"{c}-{m}", marks=[pytest.mark.slow] if (c, m) in SLOW_ROWS else [])
        for c, m in ROWS
    ],
)
def test_step_costs_the_floor_plus_the_adapters_own_work(case, method):
    adapted, c_floor, c_step = compiled_pair(case, method)
    extra = _flops(c_step) - _flops(c_floor)
    bound = analytic(adapted, B * T)
    assert bound > 0
    # 1.25x the analytic terms plus a small constant for the loss / scale bookkeeping
    assert extra <= 1.25 * bound + 2e3, (extra, bound)
    # no relayout of activations beyond the floor's (3-D ``x @ A`` costs two per adapter)
    step_copies = activation_copies(c_step.as_text(), adapted, B * T)
    floor_copies = activation_copies(c_floor.as_text(), adapted, B * T)
    assert len(step_copies) <= len(floor_copies), "\n".join(step_copies)
    if method in EXEMPT_FROM_HLO:
        return
    sizes = weight_sizes(adapted)
    step_ops = weight_sized_ops(c_step.as_text(), sizes)
    floor_ops = weight_sized_ops(c_floor.as_text(), sizes)
    assert len(step_ops) <= len(floor_ops), "\n".join(step_ops)


def test_the_guard_catches_a_materialised_delta():
    """The same checks fail for the naive step that builds ``W + dW`` every step."""
    params, fwd, x, _ = CASES["llama"]()
    adapted = pj.inject(params, CONFIGS["lora"], key=jax.random.key(2))
    t, f = pj.partition(adapted)
    y = jnp.zeros_like(fwd(params, x))

    def naive(t):
        return jnp.mean((fwd(pj.merge_and_unload(pj.combine(t, f)), x) - y) ** 2)

    def floor(s):
        return jnp.mean((fwd(params, x * s) - y) ** 2)

    c_naive = jax.jit(jax.grad(naive)).lower(t).compile()
    c_floor = jax.jit(jax.grad(floor)).lower(jnp.float32(1.0)).compile()
    sizes = weight_sizes(adapted)
    assert len(weight_sized_ops(c_naive.as_text(), sizes)) > len(
        weight_sized_ops(c_floor.as_text(), sizes)
    )
    assert _flops(c_naive) - _flops(c_floor) > 1.25 * analytic(adapted, B * T)


def test_hlo_size_parser():
    hlo = (
        "  %a = f32[24,40]{1,0} fusion(%p), kind=kLoop\n"
        "  %p = f32[24,40]{1,0} parameter(0)\n"
        "  %b = bf16[960]{0} copy(%x)\n"
        "  %c = f32[20,24]{1,0} dot(%x, %y)\n"
    )
    assert len(weight_sized_ops(hlo, {960})) == 2
    assert np.prod((24, 40)) == 960


def _inference_flops(tokens: int):
    module = MLP()
    x = jax.random.normal(jax.random.key(0), (1, tokens, D))
    params = module.init(jax.random.key(1), x)
    adapted = pj.inject(params, CONFIGS["lora"], key=jax.random.key(2))
    adapted = pj.combine(*_randomize_b(*pj.partition(adapted)))
    fwd = lambda p, x: module.apply(p, x)  # noqa: E731
    merged = pj.merge_and_unload(adapted)
    c_un = jax.jit(pj.apply(fwd)).lower(adapted, x).compile()
    c_me = jax.jit(fwd).lower(merged, x).compile()
    np.testing.assert_allclose(c_un(adapted, x), c_me(merged, x), rtol=1e-5, atol=1e-5)
    # A @ B, times the scale, plus W: (2 r + 2) in out per weight, two blocks
    delta = sum((2 * R + 2) * i * o for i, o in [(D, H), (H, D)]) * 2
    factored = sum(2 * tokens * R * (i + o) for i, o in [(D, H), (H, D)]) * 2
    return _flops(c_un), _flops(c_me), delta, factored


def _randomize_b(t, f):
    t = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 if getattr(p[-1], "key", None) == "lora_B" else a, t
    )
    return t, f


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_inference_builds_the_delta_once_when_that_is_cheaper():
    """Not differentiated, with more tokens than ``in*out/(in+out)``, a LoRA dot runs as
    ``x @ (W + dW)`` (the delta built once per call); with few tokens it stays factored. Under
    ``jax.grad`` it is always factored (the guards above: no weight-sized op in a step)."""
    un, me, delta, factored = _inference_flops(tokens=200)
    assert factored > delta
    assert un - me <= 1.05 * delta < factored
    un, me, delta, factored = _inference_flops(tokens=4)
    assert factored < delta
    assert un - me <= 1.1 * factored < delta


def _scan_outputs(jaxpr) -> list:
    """Output avals of the first scan in ``jaxpr`` (searching nested jaxprs)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            return [v.aval for v in eqn.outvars]
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                got = _scan_outputs(inner)
                if got:
                    return got
    return []


@pytest.mark.parametrize("tokens", [4, 64], ids=["factored", "fused"])
def test_modules_reading_one_input_share_its_flattened_copy_in_a_scan(tokens):
    """Under ``lax.scan`` the forward stacks what the backward needs: LoRA's factor gradients
    need each adapted module's input, flattened to 2-D. q, k and v read one input, so one
    flattened copy per layer is stacked, not three (on both forward paths: the factored one,
    and the fused ``x @ (W + dW)`` whose JVP is factored)."""
    L, d = 3, 8
    k = jax.random.split(jax.random.key(0), 3)
    params = {n: jax.random.normal(kk, (L, d, d)) for n, kk in zip(("q", "k", "v"), k)}
    cfg = pj.LoraConfig(r=2, target_modules=["q", "k", "v"])
    q = pj.inject(params, cfg, key=0, layouts=pj.Layout("dense", stack=1))
    x = jnp.ones((2, tokens // 2, d))  # (batch, seq, features): flattened to (tokens, d)

    def f(p, x):
        def body(h, w):
            return jnp.tanh(h @ w["q"] + h @ w["k"] + h @ w["v"]), None

        return jax.lax.scan(body, x, p)[0].sum()

    t, fr = pj.partition(q)
    grad = jax.grad(lambda t: pj.apply(f)(pj.combine(t, fr), x))
    outs = _scan_outputs(jax.make_jaxpr(grad)(t).jaxpr)
    flat_inputs = [a for a in outs if tuple(a.shape) == (L, tokens, d)]
    assert len(flat_inputs) == 1, [a.shape for a in outs]  # one copy for q, k and v together
