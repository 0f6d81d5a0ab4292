"""Adaption prompt (LLaMA-Adapter) forward as a Flax method interceptor, against a numpy Llama.

The numpy reference below is an independent float64 Llama forward written from the params
(RMSNorm, rotate_half RoPE, GQA with consecutive KV-head repeats, SiLU MLP) plus PEFT's adapter
term ``o_proj(merge_heads((gate * softmax(q K_p^T / sqrt(d))) @ V_p))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from peftjax.errors import UnsupportedModuleError  # noqa: E402
from peftjax.methods._adaption_forward import adapter_output, interceptor  # noqa: E402
from tests.conftest import make_hf_llama, random_model_params  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "peft" / "prompt" / "llama_adaption_prompt"
TARGET = ("model", "layers", "1", "self_attn")


_random_params = random_model_params


def _logits_fn(model):
    @jax.jit
    def logits(params, ids, pos, targets):
        with nn.intercept_methods(interceptor(targets)):
            return model(ids, position_ids=pos, params=params).logits

    return logits


@pytest.fixture(scope="module")
def tiny():
    # _do_init=False + numpy-random params: the same random model as `FlaxLlamaForCausalLM(cfg,
    # seed=0)` would be, without compiling its init (seconds on a 2-core CPU)
    model, params = make_hf_llama(layers=2)
    cfg = model.config
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    pos = jnp.asarray(np.stack([np.arange(6), np.arange(6) + 5]), jnp.int32)  # row 1 shifted
    return cfg, model, params, prompt, ids, pos, _logits_fn(model)


# --------------------------------------------------------------------------- numpy reference


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos):  # x [B, S, H, d], pos [B, S]; HF Llama: rotate_half, theta 10000
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    emb = np.concatenate([pos[..., None] * inv] * 2, axis=-1)[:, :, None, :]
    half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * np.cos(emb) + half * np.sin(emb)


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_llama(params, cfg, ids, pos=None, adapters=None, mask=None):
    """float64 logits; ``adapters`` = {layer index: (prompt, gate)}."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    B, S = ids.shape
    pos = np.broadcast_to(np.arange(S), (B, S)) if pos is None else np.asarray(pos)
    mask = np.ones((B, S)) if mask is None else np.asarray(mask)
    allowed = np.tril(np.ones((S, S), bool))[None, None] & (mask[:, None, None, :] > 0)
    x = p["model"]["embed_tokens"]["embedding"][np.asarray(ids)]
    for i in range(cfg.num_hidden_layers):
        lp = p["model"]["layers"][str(i)]
        a = lp["self_attn"]
        h = _rms(x, lp["input_layernorm"]["weight"], cfg.rms_norm_eps)
        q = _rope((h @ a["q_proj"]["kernel"]).reshape(B, S, H, d), pos)
        k = _rope((h @ a["k_proj"]["kernel"]).reshape(B, S, Hkv, d), pos)
        v = (h @ a["v_proj"]["kernel"]).reshape(B, S, Hkv, d)
        k, v = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        s = np.where(allowed, s, -1e30)
        o = np.einsum("bhqk,bkhd->bqhd", _softmax(s), v).reshape(B, S, H * d)
        o = o @ a["o_proj"]["kernel"]
        if adapters and i in adapters:
            prompt, gate = (np.asarray(t, np.float64) for t in adapters[i])
            kp = (prompt[0] @ a["k_proj"]["kernel"]).reshape(-1, Hkv, d)
            vp = (prompt[0] @ a["v_proj"]["kernel"]).reshape(-1, Hkv, d)
            kp, vp = np.repeat(kp, H // Hkv, axis=1), np.repeat(vp, H // Hkv, axis=1)
            sp = gate.reshape(()) * _softmax(np.einsum("bqhd,khd->bhqk", q, kp) / np.sqrt(d))
            o = o + np.einsum("bhqk,khd->bqhd", sp, vp).reshape(B, S, H * d) @ a["o_proj"]["kernel"]
        x = x + o
        h = _rms(x, lp["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        m = lp["mlp"]
        g = h @ m["gate_proj"]["kernel"]
        x = x + (g / (1 + np.exp(-g)) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = _rms(x, p["model"]["norm"]["weight"], cfg.rms_norm_eps)
    return x @ p["lm_head"]["kernel"]


# --------------------------------------------------------------------------- the tiny model


def test_module_path_of_flax_llama_attention(tiny):
    _, model, params, _, ids, _, _ = tiny
    seen = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and type(context.module).__name__.endswith(
            "Attention"
        ):
            seen.append(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda p: model(ids, params=p).logits, params)
    assert seen == [("model", "layers", "0", "self_attn"), ("model", "layers", "1", "self_attn")]


def test_numpy_reference_matches_base_model(tiny):
    cfg, _, params, _, ids, pos, logits = tiny
    base = np.asarray(logits(params, ids, pos, {}))
    np.testing.assert_allclose(base, np_llama(params, cfg, ids, pos=pos), atol=1e-4)


@pytest.mark.slow
def test_gate_zero_is_exactly_the_base_model(tiny):
    # eager, the documented usage (two jitted programs may differ in the last bit: XLA fuses the
    # base and the adapted graph differently)
    _, model, params, prompt, ids, pos, logits = tiny
    base = model(ids, position_ids=pos, params=params).logits
    with nn.intercept_methods(interceptor({TARGET: (prompt, jnp.zeros((1,)))})):
        out = model(ids, position_ids=pos, params=params).logits
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    jitted = logits(params, ids, pos, {TARGET: (prompt, jnp.zeros((1,)))})
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(base), atol=1e-6)


def test_logits_match_numpy_llama_with_adapter(tiny):
    cfg, model, params, prompt, ids, pos, logits = tiny
    gate = jnp.array([0.7], jnp.float32)
    out = np.asarray(logits(params, ids, pos, {TARGET: (prompt, gate)}))
    ref = np_llama(params, cfg, ids, pos=pos, adapters={1: (prompt, gate)})
    np.testing.assert_allclose(out, ref, atol=1e-4)
    base = np_llama(params, cfg, ids, pos=pos)
    assert np.abs(ref - base).max() > 1e-1  # the adapter term is far above the tolerance
    # the documented eager usage gives the same logits
    with nn.intercept_methods(interceptor({TARGET: (prompt, gate)})):
        eager = np.asarray(model(ids, position_ids=pos, params=params).logits)
    np.testing.assert_allclose(eager, out, atol=1e-5)
    # wrapping both layers, one with a scalar gate and a shorter prompt
    two = {("model", "layers", "0", "self_attn"): (prompt[:, :2], 0.3), TARGET: (prompt, gate)}
    out2 = np.asarray(logits(params, ids, pos, two))
    ref2 = np_llama(
        params, cfg, ids, pos=pos, adapters={0: (prompt[:, :2], 0.3), 1: (prompt, gate)}
    )
    np.testing.assert_allclose(out2, ref2, atol=1e-4)


def test_jit_and_grad_through_prompt_and_gate(tiny):
    _, model, params, prompt, ids, pos, logits = tiny

    def loss(prompt, gate):
        with nn.intercept_methods(interceptor({TARGET: (prompt, gate)})):
            out = model(ids, position_ids=pos, params=params).logits
        return jnp.mean(jax.nn.log_softmax(out)[..., 0])

    gate = jnp.array([0.7], jnp.float32)
    val, (gp, gg) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(prompt, gate)
    want = jnp.mean(jax.nn.log_softmax(logits(params, ids, pos, {TARGET: (prompt, gate)}))[..., 0])
    np.testing.assert_allclose(val, want, rtol=1e-5)
    assert gp.shape == prompt.shape and gg.shape == gate.shape
    assert np.all(np.isfinite(gp)) and np.abs(gp).max() > 0
    assert np.abs(gg).max() > 0
    # the gate's gradient matches a central finite difference (in float64 numpy)
    cfg = tiny[0]

    def np_loss(g):
        out = np_llama(params, cfg, ids, pos=pos, adapters={1: (prompt, np.array([g]))})
        out = out - out.max(-1, keepdims=True)
        return np.mean((out - np.log(np.exp(out).sum(-1, keepdims=True)))[..., 0])

    eps = 1e-4
    fd = (np_loss(0.7 + eps) - np_loss(0.7 - eps)) / (2 * eps)
    np.testing.assert_allclose(gg[0], fd, rtol=1e-3, atol=1e-6)


def test_adapter_output_direct_on_bound_attention(tiny):
    cfg, _, params, prompt, _, _, _ = tiny
    attn = transformers.models.llama.modeling_flax_llama.FlaxLlamaAttention(cfg)
    variables = {"params": params["model"]["layers"]["1"]["self_attn"]}
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    pos = jnp.array([[0, 1, 2], [7, 8, 9]])
    term = jax.jit(lambda v, x, pos: adapter_output(attn.bind(v), x, pos, prompt, 0.7))(
        variables, x, pos
    )
    a = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), variables["params"])
    p0 = np.asarray(prompt[0], np.float64)
    q = _rope((np.asarray(x, np.float64) @ a["q_proj"]["kernel"]).reshape(2, 3, 4, 8), pos)
    kp = np.repeat((p0 @ a["k_proj"]["kernel"]).reshape(4, 2, 8), 2, 1)
    vp = np.repeat((p0 @ a["v_proj"]["kernel"]).reshape(4, 2, 8), 2, 1)
    s = 0.7 * _softmax(np.einsum("bqhd,khd->bhqk", q, kp) / np.sqrt(8))
    ref = np.einsum("bhqk,khd->bqhd", s, vp).reshape(2, 3, 32) @ a["o_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(term), ref, atol=1e-5)


# --------------------------------------------------------------------------- other linen modules


def _jnp_rope(q, pos):
    d = q.shape[-1]
    inv = 1.0 / (10000.0 ** (jnp.arange(0, d, 2) / d))
    emb = jnp.concatenate([pos[..., None] * inv] * 2, -1)[:, :, None, :]
    half = jnp.concatenate([-q[..., d // 2 :], q[..., : d // 2]], -1)
    return q * jnp.cos(emb) + half * jnp.sin(emb)


class ProtocolAttention(nn.Module):
    """A compact linen attention (biased projections) following the adaption protocol."""

    heads: int = 4
    kv_heads: int = 2
    dim: int = 8

    @nn.compact
    def __call__(self, x, pos):
        q = nn.Dense(self.heads * self.dim, name="q_proj")(x)
        q = _jnp_rope(q.reshape(q.shape[:2] + (self.heads, self.dim)), pos)
        k = nn.Dense(self.kv_heads * self.dim, name="k_proj")(x)
        v = nn.Dense(self.kv_heads * self.dim, name="v_proj")(x)
        k = _jnp_rope(k.reshape(q.shape[:2] + (self.kv_heads, self.dim)), pos)
        k = jnp.repeat(k, 2, axis=2)
        v = jnp.repeat(v.reshape(q.shape[:2] + (self.kv_heads, self.dim)), 2, axis=2)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.dim), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape)
        return nn.Dense(x.shape[-1], name="o_proj")(o)

    def adaption_queries(self, hidden_states, pos):
        p = self.variables["params"]["q_proj"]
        q = hidden_states @ p["kernel"] + p["bias"]
        return _jnp_rope(q.reshape(q.shape[:2] + (self.heads, self.dim)), pos)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, pos):
        return x + ProtocolAttention(name="attn")(x, pos)


def test_protocol_module_inside_interceptor():
    x = jax.random.normal(jax.random.key(0), (2, 3, 32))
    pos = jnp.broadcast_to(jnp.arange(3), (2, 3))
    variables = jax.jit(Block().init)(jax.random.key(1), x, pos)
    prompt = jax.random.normal(jax.random.key(2), (1, 5, 32))

    @jax.jit
    def run(variables, targets):
        with nn.intercept_methods(interceptor(targets)):
            return Block().apply(variables, x, pos)

    base = run(variables, {})
    out = run(variables, {("attn",): (prompt, 0.9)})
    a = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), variables["params"]["attn"])

    def lin(t, n):
        return np.asarray(t, np.float64) @ a[n]["kernel"] + a[n]["bias"]

    q = _rope(lin(x, "q_proj").reshape(2, 3, 4, 8), np.asarray(pos))
    kp = np.repeat(lin(prompt[0], "k_proj").reshape(5, 2, 8), 2, 1)
    vp = np.repeat(lin(prompt[0], "v_proj").reshape(5, 2, 8), 2, 1)
    s = 0.9 * _softmax(np.einsum("bqhd,khd->bhqk", q, kp) / np.sqrt(8))
    term = lin(np.einsum("bhqk,khd->bqhd", s, vp).reshape(2, 3, 32), "o_proj")  # o_proj bias too
    np.testing.assert_allclose(np.asarray(out), np.asarray(base) + term, atol=1e-5)


class NoQueries(nn.Module):
    def setup(self):
        self.k_proj = nn.Dense(8)
        self.v_proj = nn.Dense(8)
        self.o_proj = nn.Dense(8)

    def __call__(self, x):
        return self.o_proj(self.v_proj(x) + self.k_proj(x))


def test_unsupported_module_names_path_and_what_is_missing():
    x = jnp.ones((1, 2, 8))
    variables = jax.eval_shape(nn.Sequential([NoQueries()]).init, jax.random.key(0), x)
    with nn.intercept_methods(interceptor({("layers_0",): (jnp.ones((1, 3, 8)), 0.5)})):
        with pytest.raises(UnsupportedModuleError, match=r"`layers_0`.*adaption_queries"):
            jax.eval_shape(nn.Sequential([NoQueries()]).apply, variables, x)


# --------------------------------------------------------------------------- HF PEFT fixture


@pytest.mark.slow
def test_flax_generate_with_cache_matches_peft_fixture():
    """transformers' Flax ``generate`` (KV cache, one token a step) under the interceptor."""
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    cfg_dict = json.loads((FIXTURE / "model_config.json").read_text())
    cfg_dict.pop("model_class", None)
    flat = load_file(str(FIXTURE / "flax_base.safetensors"))
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    adapter = load_file(str(FIXTURE / "adapter_model.safetensors"))
    io = load_file(str(FIXTURE / "io.safetensors"))
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg_dict), _do_init=False)
    key = "base_model.model.model.layers.1.self_attn."
    targets = {TARGET: (adapter[key + "adaption_prompt"], adapter[key + "adaption_gate"])}
    ids = io["gen_input_ids"].astype(np.int32)
    n_new = io["generated"].shape[1] - ids.shape[1]
    with nn.intercept_methods(interceptor(targets)):
        out = model.generate(
            ids,
            attention_mask=np.ones_like(ids),
            params=params,
            max_new_tokens=n_new,
            do_sample=False,
        ).sequences
    np.testing.assert_array_equal(np.asarray(out), io["generated"])
