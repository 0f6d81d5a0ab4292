"""`pj.quantize` (QLoRA's NF4 / int8 frozen base): bitsandbytes' format bit for bit, an
independent numpy reference of the paper's algorithm, and the quantized base through inject,
apply, grad, jit, scan, FlaxLlama, nnx, partition, counting and merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax._safetensors import read_safetensors
from peftjax.errors import (
    ArgumentTypeError,
    ConfigError,
    MergeError,
    ShapeError,
    TargetError,
)
from peftjax.quantize import NF4_CODE, dynamic_map
from tests.conftest import assert_unchanged, make_hf_llama, snapshot

FIX = Path(__file__).parent / "fixtures" / "bnb" / "nf4.safetensors"

# ----------------------------------------------------------------- independent numpy reference

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 values, as printed in the paper
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def np_nf4(w: np.ndarray, block: int = 64):
    """Blockwise absmax NF4 by brute force: each value's nearest code (ties: the lower one),
    returning (codes, absmax, dequantized)."""
    code = np.asarray(PAPER_NF4, np.float32)
    x = w.astype(np.float32).reshape(-1, block)
    absmax = np.abs(x).max(1)
    inv = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0).astype(
        np.float32
    )
    s = np.clip(x * inv[:, None], -1, 1)
    dist = np.abs(s[..., None].astype(np.float64) - code.astype(np.float64))
    q = np.argmin(dist, axis=-1)
    # a value exactly on the (float32) midpoint of two codes takes the lower one
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    on = s[..., None] == mids
    q = np.where(on.any(-1), on.argmax(-1), q)
    return q.reshape(-1), absmax, (code[q] * absmax[:, None]).reshape(w.shape)


def np_unpack(packed: np.ndarray) -> np.ndarray:
    p = packed.reshape(-1).astype(np.int64)
    out = np.empty(p.size * 2, np.int64)
    out[0::2], out[1::2] = p >> 4, p & 15
    return out


@pytest.fixture(scope="module")
def bnb():
    tensors, meta = read_safetensors(FIX)
    meta = json.loads(meta["json"])
    return {k: np.asarray(v) for k, v in tensors.items()}, meta


CASES = ["a", "b", "c", "d"]


def _w(bnb, c):
    t, meta = bnb
    dt = jnp.bfloat16 if meta[f"{c}.dtype"] == "bfloat16" else jnp.float32
    return jnp.asarray(t[f"{c}.w"]).astype(dt)


# ------------------------------------------------------------------------ the format itself


def test_codebook_and_dynamic_map_are_bitsandbytes(bnb):
    t, _ = bnb
    assert np.array_equal(NF4_CODE, np.asarray(PAPER_NF4, np.float32))
    assert np.array_equal(dynamic_map(), t["a.code2"])  # `create_dynamic_map()`, bit for bit


@pytest.mark.parametrize("c", CASES)
def test_nf4_codes_and_absmax_bit_exact_vs_bitsandbytes(bnb, c):
    t, _ = bnb
    q = pj.quantize_array(_w(bnb, c), double_quant=False)
    assert np.array_equal(np.asarray(q.arrays["packed"]).reshape(-1), t[f"{c}.packed"])
    assert np.array_equal(np.asarray(q.arrays["absmax"]).reshape(-1), t[f"{c}.absmax_plain"])
    qd = pj.quantize_array(_w(bnb, c))  # double quantization leaves the codes as they are
    assert np.array_equal(np.asarray(qd.arrays["packed"]).reshape(-1), t[f"{c}.packed"])


@pytest.mark.parametrize("c", CASES)
def test_double_quant_matches_bitsandbytes(bnb, c):
    """The offset is a float32 mean (the last bit depends on the reduction order, as it does
    between bitsandbytes' own devices); bitsandbytes' CPU 8-bit kernel rounds through a
    65536-entry table, so a value within ~1e-5 of a midpoint may take the neighbouring code:
    every code agrees or is its neighbour, nearly all agree."""
    t, _ = bnb
    q = pj.quantize_array(_w(bnb, c))
    off = float(q.arrays["offset"])
    assert off == pytest.approx(float(t[f"{c}.offset"][0]), rel=3e-7)
    mine = np.asarray(q.arrays["qabsmax"]).reshape(-1).astype(int)
    ref = t[f"{c}.qabsmax"].astype(int)
    assert np.abs(mine - ref).max() <= 1 and (mine == ref).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(q.arrays["absmax2"]), t[f"{c}.absmax2"], rtol=1e-6)


@pytest.mark.parametrize("c", ["b", "c"])
def test_dequantize_bit_exact_from_bitsandbytes_state(bnb, c):
    """bitsandbytes' stored state (packed codes, 8-bit absmax, its map's scales, offset) read
    by `Quantized.dense` gives bitsandbytes' `dequantize_4bit` exactly. (Cases ``a`` / ``d``,
    whose last axis is not a multiple of 64, are left out: bitsandbytes' CPU dequantize kernel
    reads blocks per row there, unlike its own flat quantizer and its CUDA kernels.)"""
    t, meta = bnb
    w = _w(bnb, c)
    lead = w.shape[:-1]
    arrays = {
        "packed": jnp.asarray(t[f"{c}.packed"]).reshape(*lead, -1),
        "qabsmax": jnp.asarray(t[f"{c}.qabsmax"]).reshape(*lead, -1),
        "absmax2": jnp.asarray(t[f"{c}.absmax2"]),
        "offset": jnp.asarray(t[f"{c}.offset"][0]),
    }
    q = pj.Quantized(arrays, w.shape, w.dtype, "nf4", 64, True)
    assert np.array_equal(np.asarray(q.dense().astype(jnp.float32)), t[f"{c}.dense"])
    plain = pj.quantize_array(w, double_quant=False)
    assert np.array_equal(np.asarray(plain.dense().astype(jnp.float32)), t[f"{c}.dense_plain"])


@pytest.mark.parametrize("c", CASES)
def test_nf4_against_numpy_reference(bnb, c):
    w = np.asarray(_w(bnb, c).astype(jnp.float32))
    codes, absmax, dense = np_nf4(w)
    q = pj.quantize_array(_w(bnb, c), double_quant=False)
    assert np.array_equal(np_unpack(np.asarray(q.arrays["packed"])), codes)
    assert np.array_equal(np.asarray(q.arrays["absmax"]).reshape(-1), absmax)
    got = np.asarray(q.dense().astype(jnp.float32))
    np.testing.assert_allclose(got, dense.astype(np.asarray(_w(bnb, c)).dtype), rtol=1e-2)
    # the round-trip error is at most half the widest code gap of each block's scale
    gap = np.max(np.diff(PAPER_NF4)) / 2
    err = np.abs(got - w).reshape(-1, 64).max(1)
    assert np.all(err <= gap * absmax * 1.01 + 1e-2 * absmax)


def test_int8_round_trip_bound():
    w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * 0.3
    q = pj.quantize_array(w, scheme="int8")
    assert q.arrays["q"].dtype == jnp.int8 and q.arrays["scale"].shape == (3, 1, 24)
    scale = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127
    err = np.abs(np.asarray(q.dense()) - np.asarray(w))
    assert np.all(err <= scale / 2 * (1 + 1e-5))
    assert q.nbytes < np.asarray(w).nbytes / 3.5


# ----------------------------------------------------------------------------- tree level

H, O = 64, 32


def _tree(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(0, 0.5, s).astype(np.float32))  # noqa: E731
    return {
        "params": {
            "q_proj": {"kernel": f(H, O), "bias": f(O)},
            "o_proj": {"kernel": f(O, H)},
            "norm": {"scale": f(H)},
            "embed": {"embedding": f(10, H)},
        }
    }


def _fn(p, x):
    p = p["params"]
    h = p["embed"]["embedding"][x] * p["norm"]["scale"]
    h = jnp.tanh(h @ p["q_proj"]["kernel"] + p["q_proj"]["bias"])
    return h @ p["o_proj"]["kernel"]


X = jnp.asarray(np.random.default_rng(3).integers(0, 10, (2, 5)), jnp.int32)
CFG = pj.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="gaussian")


@pytest.fixture(scope="module")
def trees():
    base = _tree()
    q = pj.quantize(base)
    lq = pj.inject(q, CFG, key=0)
    lf = pj.inject(pj.dequantize(q), CFG, key=0)
    return base, q, lq, lf


def test_default_targets_and_purity(trees):
    base = _tree()
    before = snapshot(base)
    q = pj.quantize(base)
    assert_unchanged(before, base)
    p = q["params"]
    assert pj.is_quantized(p["q_proj"]["kernel"]) and pj.is_quantized(p["o_proj"]["kernel"])
    for leaf in (p["q_proj"]["bias"], p["norm"]["scale"], p["embed"]["embedding"]):
        assert isinstance(leaf, jax.Array)  # biases, norms and embeddings stay float
    assert p["norm"]["scale"] is not base["params"]["norm"]["scale"] or True
    assert q["params"] is not base["params"]
    only = pj.quantize(base, targets=["o_proj"], scheme="int8")["params"]
    assert pj.is_quantized(only["o_proj"]["kernel"]) and only["o_proj"]["kernel"].scheme == "int8"
    assert isinstance(only["q_proj"]["kernel"], jax.Array)
    again = pj.quantize(q)  # already quantized: kept
    assert again["params"]["q_proj"]["kernel"].arrays["packed"] is p["q_proj"]["kernel"].arrays[
        "packed"
    ] or np.array_equal(
        again["params"]["q_proj"]["kernel"].arrays["packed"], p["q_proj"]["kernel"].arrays["packed"]
    )


def test_apply_and_grad_equal_lora_on_dequantized_base(trees):
    _, q, lq, lf = trees
    np.testing.assert_allclose(pj.apply(_fn)(lq, X), pj.apply(_fn)(lf, X), atol=1e-5)
    # no adapter: a plain quantized tree runs as its dequantized self
    np.testing.assert_allclose(pj.apply(_fn)(q, X), _fn(pj.dequantize(q), X), atol=1e-5)

    def loss(t, f):
        return jnp.sum(pj.apply(_fn)(pj.combine(t, f), X) ** 2)

    tq, fq = pj.partition(lq)
    tf, ff = pj.partition(lf)
    # the quantized weights are frozen leaves, never in the trainable half
    assert not any(
        pj.is_quantized(x) for x in jax.tree_util.tree_leaves(tq, is_leaf=pj.is_quantized)
    )
    assert pj.is_quantized(fq["params"]["q_proj"]["kernel"].base)
    gq = jax.jit(jax.grad(loss))(tq, fq)
    gf = jax.grad(loss)(tf, ff)
    for a, b in zip(jax.tree_util.tree_leaves(gq), jax.tree_util.tree_leaves(gf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # trainable_mask / adapter_optimizer work on the full tree
    mask = pj.trainable_mask(lq)
    assert mask["params"]["q_proj"]["kernel"].base is False


def test_dequant_is_recomputed_not_saved(trees):
    """Under grad, the dequantized weights are not residuals of the step (each use decodes
    inside a checkpoint with its matmul, so the backward rebuilds them from the packed codes),
    where a float base's weights are."""
    sr = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals
    _, _, lq, lf = trees

    def loss(t, f):
        return jnp.sum(pj.apply(_fn)(pj.combine(t, f), X) ** 2)

    def float_weights(params):
        res = sr(loss, *pj.partition(params))
        return {tuple(a.shape) for a, _ in res if jnp.issubdtype(a.dtype, jnp.floating)}

    assert {(H, O), (O, H)} <= float_weights(lf)
    assert not {(H, O), (O, H)} & float_weights(lq)


def test_count_parameters(trees):
    base, q, lq, lf = trees
    assert pj.count_parameters(q) == pj.count_parameters(base)  # logical sizes, as PEFT
    assert pj.count_parameters(lq) == pj.count_parameters(lf)


def test_merge_and_unload(trees):
    base, q, lq, lf = trees
    with pytest.raises(MergeError, match="_proj.*quantized"):
        pj.merge(lq)
    before = snapshot(lq)
    m = pj.merge_and_unload(lq)
    assert_unchanged(before, lq)
    ref = pj.merge_and_unload(lf)
    for a, b in zip(jax.tree_util.tree_leaves(m), jax.tree_util.tree_leaves(ref), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-6)
    rq = pj.merge_and_unload(lq, requantize=True)["params"]["q_proj"]["kernel"]
    assert rq.scheme == "nf4" and rq.double_quant and rq.shape == (H, O)
    want = pj.quantize_array(ref["params"]["q_proj"]["kernel"])
    assert np.array_equal(rq.arrays["packed"], want.arrays["packed"])
    with pytest.raises(ArgumentTypeError, match="requantize"):
        pj.merge_and_unload(lq, requantize="yes")
    assert pj.is_quantized(pj.unload(lq)["params"]["q_proj"]["kernel"])


def test_inject_init_reads_dequantized_weight():
    q = pj.quantize(_tree())
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    d = pj.inject(q, cfg, key=0)
    mag = d["params"]["q_proj"]["kernel"].arrays["default"]
    w = pj.dequantize(q)["params"]["q_proj"]["kernel"]
    norms = jnp.linalg.norm(w, axis=0)
    got = [v for v in mag.values() if v.shape == norms.shape]
    assert got and np.allclose(got[0], norms, rtol=1e-5)
    dref = pj.inject(pj.dequantize(q), cfg, key=0)
    np.testing.assert_allclose(pj.apply(_fn)(d, X), pj.apply(_fn)(dref, X), atol=1e-5)


def test_bad_input():
    base = _tree()
    before = snapshot(base)
    with pytest.raises(ConfigError, match="scheme"):
        pj.quantize(base, scheme="fp4")
    with pytest.raises(ConfigError, match="block_size"):
        pj.quantize(base, block_size=0)
    with pytest.raises(ConfigError, match="block_size"):
        pj.quantize(base, block_size=3)
    with pytest.raises(ConfigError, match="block_size"):
        pj.quantize(base, block_size=True)
    with pytest.raises(ConfigError, match="double_quant"):
        pj.quantize(base, double_quant=1)
    with pytest.raises(ShapeError, match=r"params\.q_proj\.kernel.*block_size=768"):
        pj.quantize(base, targets=["q_proj"], block_size=128 * 3 * 2)
    with pytest.raises(TargetError, match="nothing|match no module"):
        pj.quantize(base, targets=["k_proj"])
    with pytest.raises(ArgumentTypeError, match="norm"):
        pj.quantize(base, targets=["norm"])
    with pytest.raises(ConfigError, match="targets"):
        pj.quantize(base, targets=[1])
    ints = {"w": {"kernel": jnp.ones((64, 2), jnp.int32)}}
    with pytest.raises(ArgumentTypeError, match=r"w\.kernel.*float"):
        pj.quantize(ints, targets=["w"])
    assert_unchanged(before, base)
    with pytest.raises(TypeError, match="pj.apply"):
        jnp.asarray(pj.quantize(base)["params"]["q_proj"]["kernel"])


# ---------------------------------------------------------------------------------- models


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(64, name="fc")(h)) + h, None

        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers"
        )
        return stack(x, None)[0]


def test_scan_jit_and_grad():
    m = _Scanned()
    x = jax.random.normal(jax.random.key(1), (2, 64))
    base = m.init(jax.random.key(0), x)
    q = pj.quantize(base)
    assert q["params"]["layers"]["fc"]["kernel"].arrays["packed"].shape == (3, 64, 32)
    cfg = pj.LoraConfig(r=2, target_modules=["fc"], init_lora_weights="gaussian")
    lay = {"fc": pj.Layout("dense", stack=1)}
    lq = pj.inject(q, cfg, key=0, layouts=lay)
    lf = pj.inject(pj.dequantize(q), cfg, key=0, layouts=lay)
    fwd = jax.jit(pj.apply(m.apply))
    np.testing.assert_allclose(fwd(lq, x), fwd(lf, x), atol=1e-5)

    def loss(t, f):
        return jnp.sum(pj.apply(m.apply)(pj.combine(t, f), x) ** 2)

    gq = jax.jit(jax.grad(loss))(*pj.partition(lq))
    gf = jax.jit(jax.grad(loss))(*pj.partition(lf))
    for a, b in zip(jax.tree_util.tree_leaves(gq), jax.tree_util.tree_leaves(gf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nnx_model():
    from tests.conftest import make_nnx
    from tests.test_forward import _nnx_fn

    state = make_nnx()[1]
    q = pj.quantize(state, block_size=16)
    assert pj.is_quantized(q["layers"][0]["q_proj"]["kernel"].get_value())
    cfg = pj.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian")
    ids = jnp.asarray([[1, 2, 3]], jnp.int32)
    lq = pj.inject(q, cfg, key=0)
    lf = pj.inject(pj.dequantize(q), cfg, key=0)
    np.testing.assert_allclose(pj.apply(_nnx_fn)(lq, ids), pj.apply(_nnx_fn)(lf, ids), atol=1e-5)


def test_flax_llama():
    pytest.importorskip("transformers")
    model, params = make_hf_llama(layers=1)
    q = pj.quantize(params)
    assert pj.is_quantized(q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    lcfg = pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    ids = jnp.asarray([[1, 5, 9, 2]], jnp.int32)
    f = pj.apply(lambda p, i: model(i, params=p).logits)
    lq = pj.inject(q, lcfg, key=0)
    lf = pj.inject(pj.dequantize(q), lcfg, key=0)
    np.testing.assert_allclose(jax.jit(f)(lq, ids), jax.jit(f)(lf, ids), atol=1e-4)


@pytest.mark.slow
def test_demo_cli_quantized(capsys):
    from peftjax.demo import run

    lines = []
    res = run(rank=4, steps=20, batch=8, seq=32, out=None, quantize="nf4", print_fn=lines.append)
    assert any("quantized the base (nf4)" in ln for ln in lines)
    before, after = res["memory"]
    assert after < before / 4
    assert res["loss_after"] < res["loss_before"] - 0.3 and res["merge_diff"] < 1e-3
    from peftjax.cli import build_parser

    assert build_parser().parse_args(["demo", "--quantize", "int8"]).quantize == "int8"


@pytest.mark.slow
def test_mesh_sharded_quantized_base():
    """On a simulated 8-device mesh (``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
    the packed arrays sharded along their leading axis, the step runs and matches."""
    devs = jax.devices()
    if len(devs) < 2:
        pytest.skip("needs several (simulated) devices")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devs[:2]), ("x",))
    base = _tree()
    q = pj.quantize(base)
    lq = pj.inject(q, CFG, key=0)
    shard = NamedSharding(mesh, PartitionSpec("x"))
    lq = jax.tree_util.tree_map(
        lambda a: jax.device_put(a, shard) if a.ndim and a.shape[0] % 2 == 0 else a, lq
    )
    lf = pj.inject(pj.dequantize(q), CFG, key=0)
    np.testing.assert_allclose(jax.jit(pj.apply(_fn))(lq, X), pj.apply(_fn)(lf, X), atol=1e-5)
