"""Shared helpers for the benchmark scripts (models, cost analysis, side-by-side timing).

Benchmarks may import torch / peft / transformers / qwix; the library never does.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------ config


def llama_config(hidden=512, inter=1376, layers=4, heads=8, vocab=1024, max_pos=2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )


# ------------------------------------------------------------------------------------ FlaxLlama


def flax_llama(cfg, seed=0):
    """``(params, fwd)`` for transformers' FlaxLlamaForCausalLM with random weights.

    ``fwd(params, ids) -> logits``: the linen module's apply (no HF python-side wrapper), with
    an all-ones attention mask and positions ``0..S-1``.
    """
    from transformers import FlaxLlamaForCausalLM

    m = FlaxLlamaForCausalLM(cfg, seed=seed, input_shape=(1, 8))
    module = m.module

    def fwd(params, ids):
        b, s = ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out = module.apply({"params": params}, ids, jnp.ones_like(ids), pos, return_dict=False)
        return out[0]

    return m.params, fwd


def lm_loss(logits, ids):
    """Next-token cross entropy (mean over ``B*(S-1)`` positions), as HF's causal-LM loss."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]
    ).mean()


def random_ids(batch, seq, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


def lora_config(r, targets=ATTN):
    import peftjax as pj

    return pj.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))


def randomize_lora_b(params, key, scale=0.02):
    """Give every LoRA ``B`` random values (PEFT initialises it to zero)."""
    import peftjax as pj

    t, f = pj.partition(params)
    leaves, tdef = jax.tree_util.tree_flatten_with_path(t)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys, strict=True):
        is_b = getattr(path[-1], "key", None) == "lora_B"
        out.append(scale * jax.random.normal(k, x.shape, x.dtype) if is_b else x)
    leaves = out
    return pj.combine(jax.tree_util.tree_unflatten(tdef, leaves), f)


# ------------------------------------------------------------------------------------ nnx model


def nnx_llama(
    hidden=512, inter=1376, layers=4, heads=8, vocab=1024, lora_rank=None, seed=0, lora_targets=ATTN
):
    """A small Llama-style nnx model; the ``lora_targets`` projections (default q/k/v/o) are
    ``nnx.LoRALinear`` when ``lora_rank``."""
    from flax import nnx

    def lin(i, o, rngs, name=None):
        if name in lora_targets and lora_rank:
            return nnx.LoRALinear(i, o, lora_rank=lora_rank, use_bias=False, rngs=rngs)
        return nnx.Linear(i, o, use_bias=False, rngs=rngs)

    class RMSNorm(nnx.Module):
        def __init__(self, d):
            self.weight = nnx.Param(jnp.ones((d,), jnp.float32))

        def __call__(self, x):
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            return y * self.weight[...]

    def rope(x):
        s, hd = x.shape[1], x.shape[-1]
        freqs = 10000.0 ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
        ang = jnp.arange(s, dtype=jnp.float32)[:, None] * freqs[None, :]
        cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    class Attention(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = lin(hidden, hidden, rngs, "q_proj")
            self.k_proj = lin(hidden, hidden, rngs, "k_proj")
            self.v_proj = lin(hidden, hidden, rngs, "v_proj")
            self.o_proj = lin(hidden, hidden, rngs, "o_proj")

        def __call__(self, x):
            b, t, d = x.shape
            hd = d // heads
            q = rope(self.q_proj(x).reshape(b, t, heads, hd))
            k = rope(self.k_proj(x).reshape(b, t, heads, hd))
            v = self.v_proj(x).reshape(b, t, heads, hd)
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
            mask = jnp.tril(jnp.ones((t, t), bool))
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
            return self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.input_layernorm = RMSNorm(hidden)
            self.self_attn = Attention(rngs)
            self.post_attention_layernorm = RMSNorm(hidden)
            self.gate_proj = lin(hidden, inter, rngs, "gate_proj")
            self.up_proj = lin(hidden, inter, rngs, "up_proj")
            self.down_proj = lin(inter, hidden, rngs, "down_proj")

        def __call__(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))

    class Llama(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(vocab, hidden, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(layers)])
            self.norm = RMSNorm(hidden)
            self.lm_head = lin(hidden, vocab, rngs)

        def __call__(self, ids):
            x = self.embed_tokens(ids)
            for blk in self.layers:
                x = blk(x)
            return self.lm_head(self.norm(x))

    return Llama(nnx.Rngs(seed))


# ------------------------------------------------------------------------------------ XLA analysis


def compile_fn(fn, *args, donate=()):
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    d = {
        "args": ma.argument_size_in_bytes,
        "out": ma.output_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
    }
    d["peak"] = d["args"] + d["out"] + d["temp"] - d["alias"]
    return d


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def tree_size(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------ timing


def round_robin(
    fns: dict,
    reps: int,
    warmup: int = 2,
    budget_s: float | None = None,
    pause: float = 0.02,
    min_sample_s: float = 0.0,
):
    """Median and min seconds per call of each zero-arg ``fn`` (which must block until done).

    Runs round-robin (one call of each per round, the order reversed every other round so no
    entry always follows the same neighbour) so that machine-load changes hit every entry
    alike; the side-by-side ratios are what is meaningful on a shared machine. Stops early
    (after at least 4 rounds) once ``budget_s`` is spent. ``pause`` seconds (not timed)
    separate calls so that one runtime's spinning worker threads do not slow the next. A sample
    is ``k`` back-to-back calls (``k`` chosen in warmup so a sample lasts ``min_sample_s``),
    divided by ``k``.

    Returns ``(median, minimum, rounds)``, dicts keyed like ``fns``.
    """
    inner = {}
    for _ in range(warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            inner[k] = max(1, math.ceil(min_sample_s / max(dt, 1e-6)))
    n_in = max(inner.values()) if inner else 1  # same k for every entry
    times = {k: [] for k in fns}
    t_start = time.perf_counter()
    for i in range(reps):
        items = list(fns.items())
        for k, f in items[::-1] if i % 2 else items:
            time.sleep(pause)
            t0 = time.perf_counter()
            for _ in range(n_in):
                f()
            times[k].append((time.perf_counter() - t0) / n_in)
        if budget_s is not None and i >= 3 and time.perf_counter() - t_start > budget_s:
            break
    return (
        {k: statistics.median(v) for k, v in times.items()},
        {k: min(v) for k, v in times.items()},
        {k: len(v) for k, v in times.items()},
    )


# ------------------------------------------------------------------------------------ report


def machine_info() -> str:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import flax

    parts = [
        f"CPU: {model}, {os.cpu_count()} cores visible",
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s))",
        f"flax {flax.__version__}",
        f"optax {optax.__version__}",
    ]
    try:
        load = os.getloadavg()
        parts.append(f"load avg at start {load[0]:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def gf(x) -> str:
    return f"{x / 1e9:.3f}"


def mb(x) -> str:
    return f"{x / 2**20:.1f}"
