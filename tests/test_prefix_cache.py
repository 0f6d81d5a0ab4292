"""Prefix tuning into transformers' Flax Llama / GPT-2 through a pre-filled KV cache
(`peftjax.methods._prefix_cache`), against independent numpy forwards of both models: each layer
attends over ``[prefix_k (unrotated); real keys]``, the real tokens at positions ``T..T+N-1``
(PEFT's forward; HF torch's cache positions start at the past length), mask ``[1_T; mask]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import ShapeError, UnsupportedModuleError
from peftjax.methods._prefix_cache import hf_prefix_inputs, kv_layout

transformers = pytest.importorskip("transformers")
from tests.conftest import tiny_llama_config  # noqa: E402

transformers.logging.set_verbosity_error()

T = 3


# ----------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def llama():
    return _build(transformers.FlaxLlamaForCausalLM, tiny_llama_config(2))


@pytest.fixture(scope="module")
def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _build(transformers.FlaxGPT2LMHeadModel, cfg)


def _build(cls, cfg, **kw):
    """A tiny model and random params of its own structure (``init`` only traced, not run): values
    larger than HF's 0.02 init, so that attention is far from uniform and every term shows."""
    model = cls(cfg, _do_init=False, **kw)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 1)))
    rng = np.random.default_rng(0)

    def fill(path, sd):
        name = path[-1].key
        z = rng.normal(0.0, 1.0, sd.shape).astype(np.float32)
        return jnp.asarray(
            1.0 + 0.1 * z if name in ("weight", "scale") else (0.1 if name == "bias" else 0.3) * z
        )

    _PARAMS[id(model)] = jax.tree_util.tree_map_with_path(fill, shapes)
    return model


_PARAMS: dict = {}


def _params(model):
    return _PARAMS[id(model)]


_JIT: dict = {}


def _pair(out):
    return out.logits, out.past_key_values


def _call(model, params, prefix, ids, mask=None, pos=None):
    """``(logits, cache)`` of ``model(**hf_prefix_inputs(...), params=...)``, jitted per model."""
    fn = _JIT.get(id(model))
    if fn is None:
        fn = _JIT[id(model)] = jax.jit(
            lambda params, prefix, ids, mask, pos: _pair(
                model(**_kw(model, prefix, ids, mask, position_ids=pos), params=params)
            )
        )
    return fn(params, prefix, ids, mask, pos)


def _logits(*a):
    return np.asarray(_call(*a)[0])


def _np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def _inputs(seed, B=2, N=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (B, N)).astype(np.int32)
    mask = np.ones((B, N), np.int32)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def _prefix(model, seed=1, batch=None):
    L, H, d = kv_layout(model.config)
    shape = (T, 2 * L * H * d) if batch is None else (batch, T, 2 * L * H * d)
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def _kw(model, prefix, ids, mask=None, **extra):
    L, H, d = kv_layout(model.config)
    return hf_prefix_inputs(
        model, prefix, ids, mask, num_layers=L, num_kv_heads=H, head_dim=d, **extra
    )


# ------------------------------------------------------------------------- numpy references
def _attend(q, k, v, pk, pv, mask, causal_pos=None):
    """q [B,N,H,d], k/v [B,N,Hkv,d] real, pk/pv [B,T,Hkv,d] prefix; mask [B,N] -> [B,N,H,d]."""
    B, N, H, d = q.shape
    rep = H // k.shape[2]
    K = np.repeat(np.concatenate([pk, k], 1), rep, axis=2)  # HF repeat_kv: consecutive copies
    V = np.repeat(np.concatenate([pv, v], 1), rep, axis=2)
    Tp = pk.shape[1]
    s = np.einsum("bqhd,bkhd->bhqk", q, K) / math.sqrt(d)
    allowed = np.ones((B, N, Tp + N), bool)
    allowed[:, :, Tp:] = np.tril(np.ones((N, N), bool))[None] & (mask[:, None, :] > 0)
    s = np.where(allowed[:, None], s, -1e30)
    s = np.exp(s - s.max(-1, keepdims=True))
    p = s / s.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, V)


def _split_prefix(prefix, B, L, H, d):
    p = np.asarray(prefix, np.float64)
    if p.ndim == 2:
        p = np.broadcast_to(p[None], (B,) + p.shape)
    p = p.reshape(B, p.shape[1], 2 * L, H, d)  # PEFT's view; slot 2l keys, 2l+1 values
    return [(p[:, :, 2 * l], p[:, :, 2 * l + 1]) for l in range(L)]


def _rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    f = pos[..., None].astype(np.float64) * inv  # [B, N, d/2]
    emb = np.concatenate([f, f], -1)[:, :, None, :]
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)  # HF rotate_half
    return x * np.cos(emb) + rot * np.sin(emb)


def llama_ref(model, params, prefix, ids, mask, pos):
    c = model.config
    P = _np(params)
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    d = c.hidden_size // H
    B, N = ids.shape
    kv = _split_prefix(prefix, B, c.num_hidden_layers, Hkv, d)
    rms = lambda x, w: x / np.sqrt((x**2).mean(-1, keepdims=True) + c.rms_norm_eps) * w  # noqa: E731
    x = P["model"]["embed_tokens"]["embedding"][ids]
    for l in range(c.num_hidden_layers):
        lp = P["model"]["layers"][str(l)]
        a = lp["self_attn"]
        h = rms(x, lp["input_layernorm"]["weight"])
        q = (h @ a["q_proj"]["kernel"]).reshape(B, N, H, d)
        k = (h @ a["k_proj"]["kernel"]).reshape(B, N, Hkv, d)
        v = (h @ a["v_proj"]["kernel"]).reshape(B, N, Hkv, d)
        q, k = _rope(q, pos), _rope(k, pos)
        o = _attend(q, k, v, kv[l][0], kv[l][1], mask).reshape(B, N, H * d)
        x = x + o @ a["o_proj"]["kernel"]
        m = lp["mlp"]
        h = rms(x, lp["post_attention_layernorm"]["weight"])
        g = h @ m["gate_proj"]["kernel"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = rms(x, P["model"]["norm"]["weight"])
    return x @ P["lm_head"]["kernel"]


def gpt2_ref(model, params, prefix, ids, mask, pos):
    c = model.config
    P = _np(params)["transformer"]
    H = c.n_head
    d = c.n_embd // H
    B, N = ids.shape
    kv = _split_prefix(prefix, B, c.n_layer, H, d)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + c.layer_norm_epsilon) * p["scale"] + p["bias"]

    conv = lambda x, p: x @ p["kernel"].T + p["bias"]  # noqa: E731  FlaxConv1D kernel [out, in]
    gelu = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    x = P["wte"]["embedding"][ids] + P["wpe"]["embedding"][pos]  # learned positions at pos
    for l in range(c.n_layer):
        lp = P["h"][str(l)]
        qkv = conv(ln(x, lp["ln_1"]), lp["attn"]["c_attn"])
        q, k, v = (t.reshape(B, N, H, d) for t in np.split(qkv, 3, -1))
        o = _attend(q, k, v, kv[l][0], kv[l][1], mask).reshape(B, N, H * d)
        x = x + conv(o, lp["attn"]["c_proj"])
        h = ln(x, lp["ln_2"])
        x = x + conv(gelu(conv(h, lp["mlp"]["c_fc"])), lp["mlp"]["c_proj"])
    x = ln(x, P["ln_f"])
    return x @ P["wte"]["embedding"].T  # tied head


REFS = {"llama": llama_ref, "gpt2": gpt2_ref}


# -------------------------------------------------------------------------------- the tests
def test_kv_layout(llama, gpt2):
    assert kv_layout(llama.config) == (2, 2, 8)
    assert kv_layout(gpt2.config) == (2, 4, 8)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=None,
        num_hidden_layers=3,
        head_dim=16,
    )
    assert kv_layout(cfg) == (3, 4, 16)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_pos", [pytest.param(False, marks=pytest.mark.slow), True])
def test_logits_match_numpy(family, with_pos, request):
    model = request.getfixturevalue(family)
    params = _params(model)
    ids, mask = _inputs(0)
    prefix = _prefix(model)
    B, N = ids.shape
    if with_pos:  # HF generate's convention for a left-padded row: cumsum(mask) - 1, pads -> 1
        given = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1).astype(np.int32)
        kw = _kw(model, prefix, ids, mask, position_ids=given)
        pos = given + T
    else:
        kw = _kw(model, prefix, ids, mask)
        pos = np.broadcast_to(T + np.arange(N), (B, N))
    np.testing.assert_array_equal(np.asarray(kw["position_ids"]), pos)
    np.testing.assert_array_equal(
        np.asarray(kw["attention_mask"]), np.concatenate([np.ones((B, T), np.int32), mask], 1)
    )
    logits, cache = _call(model, params, prefix, ids, mask, given if with_pos else None)
    assert logits.shape == (B, N, model.config.vocab_size)  # logits for the N real tokens only
    want = REFS[family](model, params, prefix, ids, mask, pos)
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
    # the returned cache has the prefix untouched in rows :T and the new keys after it
    c0 = cache
    for k in (
        ("model", "layers", "0", "self_attn")
        if family == "llama"
        else ("transformer", "h", "0", "attn")
    ):
        c0 = c0[k]
    assert int(c0["cache_index"]) == T + N
    np.testing.assert_allclose(
        np.asarray(c0["cached_key"][:, :T]),
        _split_prefix(prefix, B, *kv_layout(model.config))[0][0],
        atol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_mask_and_per_example_prefix(family, request):
    model = request.getfixturevalue(family)
    params = _params(model)
    ids, _ = _inputs(2)
    B, N = ids.shape
    kw = _kw(model, _prefix(model), ids)
    assert np.asarray(kw["attention_mask"]).tolist() == [[1] * (T + N)] * B
    both = _prefix(model, seed=5, batch=B)
    got = _logits(model, params, both, ids)
    for b in range(B):
        one = _logits(model, params, both[b], ids[b : b + 1])
        np.testing.assert_allclose(got[b : b + 1], one, atol=1e-5)
    pos = np.broadcast_to(T + np.arange(N), (B, N))
    want = REFS[family](model, params, both, ids, np.ones((B, N), np.int32), pos)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_jit_and_grad(family, request):
    model = request.getfixturevalue(family)
    params = _params(model)
    ids, mask = _inputs(3)
    prefix = jnp.asarray(_prefix(model))

    def loss(p, params):
        logits = model(**_kw(model, p, ids, mask), params=params).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * mask)

    vg = jax.jit(jax.value_and_grad(loss))
    val, g = vg(prefix, params)
    lp = jax.nn.log_softmax(jnp.asarray(_logits(model, params, prefix, ids, mask)))
    np.testing.assert_allclose(val, jnp.mean(lp[..., 7] * mask), rtol=1e-5, atol=1e-6)
    assert g.shape == prefix.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).max()) > 0
    # every layer's key and value slots get gradient (the whole flat width is used)
    L, H, d = kv_layout(model.config)
    per_slot = np.abs(np.asarray(g).reshape(T, 2 * L, H * d)).sum((0, 2))
    assert (per_slot > 0).all()
    # directional finite difference
    u = jnp.asarray(np.random.default_rng(9).normal(size=prefix.shape).astype(np.float32))
    eps = 1e-2
    fd = (vg(prefix + eps * u, params)[0] - vg(prefix - eps * u, params)[0]) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, u)), float(fd), rtol=2e-2, atol=1e-4)


@pytest.mark.slow
def test_bare_models(llama, gpt2):
    """FlaxLlamaModel / FlaxGPT2Model: the cache paths without the head's prefix."""
    ids, mask = _inputs(6)
    for lm, bare_cls, sub, root, head in [
        (
            llama,
            transformers.FlaxLlamaModel,
            "model",
            ("layers", "0", "self_attn"),
            lambda p, h: h @ p["lm_head"]["kernel"],
        ),
        (
            gpt2,
            transformers.FlaxGPT2Model,
            "transformer",
            ("h", "0", "attn"),
            lambda p, h: h @ p["transformer"]["wte"]["embedding"].T,
        ),
    ]:
        bare = bare_cls(lm.config, _do_init=False)
        kw = _kw(bare, _prefix(lm), ids, mask)
        entry = kw["past_key_values"]
        for k in root:
            entry = entry[k]
        assert int(entry["cache_index"]) == T
        p = _params(lm)
        hid = jax.jit(lambda kw, p, m=bare: m(**kw, params=p).last_hidden_state)(kw, p[sub])
        want = _logits(lm, p, _prefix(lm), ids, mask)
        np.testing.assert_allclose(np.asarray(head(p, hid)), want, atol=1e-4, rtol=1e-4)


def test_cache_dtype_follows_model_dtype(llama):
    m16 = transformers.FlaxLlamaForCausalLM(llama.config, dtype=jnp.bfloat16, _do_init=False)
    assert llama.module.dtype == jnp.float32 and m16.module.dtype == jnp.bfloat16
    ids, mask = _inputs(4)
    kw = _kw(m16, _prefix(llama), ids, mask)
    leaf = kw["past_key_values"]["model"]["layers"]["0"]["self_attn"]
    assert leaf["cached_key"].dtype == jnp.bfloat16 and leaf["cached_value"].dtype == jnp.bfloat16
    assert leaf["cache_index"].dtype == jnp.int32 and int(leaf["cache_index"]) == T
    out = _logits(m16, _params(llama), _prefix(llama), ids, mask)
    assert out.shape == (2, 5, 64) and np.isfinite(out.astype(np.float32)).all()
    want = _logits(llama, _params(llama), _prefix(llama), ids, mask)
    np.testing.assert_allclose(out.astype(np.float32), want, atol=0.25, rtol=0.05)


def test_errors(llama, gpt2):
    ids, mask = _inputs(0)
    L, H, d = kv_layout(llama.config)
    ok = dict(num_layers=L, num_kv_heads=H, head_dim=d)
    p = _prefix(llama)
    with pytest.raises(ShapeError, match="width"):
        hf_prefix_inputs(llama, p[:, :-8], ids, mask, **ok)
    with pytest.raises(ShapeError, match="num_layers"):
        hf_prefix_inputs(llama, p, ids, mask, **{**ok, "num_layers": 1})
    # same flat width (2*2*4*4 = 2*2*2*8) but the wrong KV split: caught at the cache's shape
    with pytest.raises(ShapeError, match="num_kv_heads"):
        hf_prefix_inputs(llama, p, ids, mask, **{**ok, "num_kv_heads": 4, "head_dim": 4})
    with pytest.raises(ShapeError, match="attention_mask"):
        hf_prefix_inputs(llama, p, ids, mask[:, 1:], **ok)
    with pytest.raises(ShapeError, match="prefix"):
        hf_prefix_inputs(llama, np.zeros((3, T, p.shape[1]), np.float32), ids, mask, **ok)
    with pytest.raises(ShapeError, match="max_position_embeddings"):
        hf_prefix_inputs(llama, np.zeros((60, p.shape[1]), np.float32), ids, mask, **ok)
    Lg, Hg, dg = kv_layout(gpt2.config)
    with pytest.raises(ShapeError, match="num_layers"):
        hf_prefix_inputs(gpt2, _prefix(gpt2), ids, mask, num_layers=3, num_kv_heads=Hg, head_dim=dg)

    class Fake:
        config = transformers.BertConfig()

        def init_cache(self, *a):  # pragma: no cover
            raise AssertionError

    with pytest.raises(UnsupportedModuleError, match="supported: llama"):
        hf_prefix_inputs(Fake(), p, ids, mask, **ok)
    with pytest.raises(UnsupportedModuleError, match="gpt2"):
        kv_layout(transformers.BertConfig())
