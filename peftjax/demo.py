"""The main job: a short fine-tune of a small Llama-style Flax model on text shipped with peftjax.

``peftjax demo`` (or ``python -m peftjax demo``) builds the model from random weights (no
network), injects an adapter (LoRA by default), trains it on ``peftjax/data/tiny_corpus.txt``
with the factored forward (`pj.apply`) and `pj.partition` (gradients and optimizer state for
the adapter only), then merges, checks that the merged model gives the adapted outputs, and
saves the adapter in HF PEFT's format. Prompt methods (``--method prompt_tuning``,
``prefix_tuning``) go through `pj.prompt_inputs` (the model takes ``prefix_key_values``), do not
merge (PEFT's rule), and sample from the adapted forward instead.
"""

from __future__ import annotations

import math
import sys
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

# ------------------------------------------------------------------------------------ model


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * w).astype(x.dtype)


def _rope(x, base: float = 10000.0, offset: int = 0):
    """Rotary position embedding on ``(batch, seq, heads, head_dim)``, positions from
    ``offset``."""
    seq, hd = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
    ang = (offset + jnp.arange(seq, dtype=jnp.float32))[:, None] * freqs[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE. ``prefix``: optional ``(keys, values)`` ``[B, T, H, d]``
    placed before the sequence's own, unrotated, the tokens then at positions ``T..`` (prefix
    tuning's KV cache, `pj.prompt_inputs`' ``prefix_key_values``)."""

    heads: int

    @nn.compact
    def __call__(self, x, prefix=None):
        b, t, d = x.shape
        hd = d // self.heads
        n_pre = 0 if prefix is None else prefix[0].shape[1]
        dense = lambda name: nn.Dense(d, use_bias=False, name=name)
        q = _rope(dense("q_proj")(x).reshape(b, t, self.heads, hd), offset=n_pre)
        k = _rope(dense("k_proj")(x).reshape(b, t, self.heads, hd), offset=n_pre)
        v = dense("v_proj")(x).reshape(b, t, self.heads, hd)
        mask = jnp.tril(jnp.ones((t, t), bool))
        if prefix is not None:
            k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
            mask = jnp.concatenate([jnp.ones((t, n_pre), bool), mask], axis=1)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        return dense("o_proj")(out)

    def adaption_queries(self, x, prefix=None):
        """The rotated queries ``[B, S, H, d]`` of ``__call__`` (adaption prompt's protocol,
        `peftjax.methods._adaption_forward`)."""
        b, t, d = x.shape
        n_pre = 0 if prefix is None else prefix[0].shape[1]
        q = x @ self.variables["params"]["q_proj"]["kernel"]
        return _rope(q.reshape(b, t, self.heads, d // self.heads), offset=n_pre)


class Block(nn.Module):
    heads: int
    inter: int

    @nn.compact
    def __call__(self, x, prefix=None):
        x = x + Attention(self.heads, name="self_attn")(RMSNorm(name="input_layernorm")(x), prefix)
        h = RMSNorm(name="post_attention_layernorm")(x)
        d = x.shape[-1]
        gate = nn.Dense(self.inter, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(self.inter, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(d, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class TinyLlama(nn.Module):
    """A Llama-shaped decoder: module paths ``model.layers_0.self_attn.q_proj`` ... ``lm_head``."""

    vocab: int
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    inter: int = 256

    @nn.compact
    def __call__(self, ids, prefix_key_values=None):
        x = nn.Embed(self.vocab, self.hidden, name="embed_tokens")(ids)
        for i in range(self.layers):
            pre = None if prefix_key_values is None else prefix_key_values[i]
            x = Block(self.heads, self.inter, name=f"layers_{i}")(x, pre)
        x = RMSNorm(name="norm")(x)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


class Model(nn.Module):
    """Wraps `TinyLlama` as ``model`` so paths read like HF's (``model.layers_0...``)."""

    vocab: int

    @nn.compact
    def __call__(self, input_ids, prefix_key_values=None):
        """Logits of ``input_ids``; ``prefix_key_values``: one ``(keys, values)`` pair per
        layer (prefix tuning, see `Attention`)."""
        return TinyLlama(self.vocab, name="model")(input_ids, prefix_key_values)


# ------------------------------------------------------------------------------------ data


def load_corpus() -> str:
    return resources.files("peftjax").joinpath("data/tiny_corpus.txt").read_text("utf-8")


class CharTokenizer:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s: str) -> np.ndarray:
        return np.array([self.index[c] for c in s if c in self.index], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = np.stack([data[s : s + seq + 1] for s in starts])
        yield x[:, :-1], x[:, 1:]


# ------------------------------------------------------------------------------------ progress


class Progress:
    """A one-line progress bar (no dependency): step, loss, tokens/s."""

    def __init__(self, total: int, stream=None, width: int = 24):
        # the stream is looked up per bar, not bound at import: `sys.stderr` may have been
        # replaced since (pytest's capture, a notebook), and the one seen at import closed
        stream = sys.stderr if stream is None else stream
        self.total, self.stream, self.width = total, stream, width
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens: int):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        done = int(self.width * step / self.total)
        bar = "#" * done + "-" * (self.width - done)
        line = f"[{bar}] step {step:4d}/{self.total}  loss {loss:6.3f}  {tokens / dt:9,.0f} tok/s"
        if self.tty:
            self.stream.write("\r" + line)
        elif step == self.total or step % max(1, self.total // 10) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------ run


def demos() -> dict:
    """``{name: (config factory, ranked, learning rate)}`` of every method's demo."""
    from .methods import METHODS

    return {name: demo for m in METHODS.values() for name, demo in m.demos.items()}


def make_config(method: str, rank: int):
    table = demos()
    if method not in table:
        raise SystemExit(f"unknown --method {method!r}: choose {', '.join(table)}")
    return table[method][0](rank)


def headline(method: str, rank: int, vocab: int, chars: int, steps: int, batch: int, seq: int):
    """The demo's first line; the rank only for methods that have one."""
    ranked = f" r={rank}" if demos()[method][1] else ""
    return (
        f"peftjax demo: {method}{ranked} on a {vocab}-symbol Llama-style model (random initial "
        f"weights), {chars:,} characters of text, {steps} steps, batch {batch}x{seq}"
    )


def run(
    method: str = "lora",
    rank: int = 8,
    steps: int = 200,
    lr: float | None = None,
    batch: int = 16,
    seq: int = 64,
    out: str | None = "peftjax-demo-adapter",
    seed: int = 0,
    print_fn=print,
    quantize: str | None = None,
) -> dict:
    """Run the demo; returns a dict of measurements (used by the tests).

    ``quantize``: ``"nf4"`` or ``"int8"`` quantizes the base before injecting (QLoRA,
    `pj.quantize`) and prints the weights' memory before and after."""
    import peftjax as pj

    text = load_corpus()
    tok = CharTokenizer(text)
    data = tok.encode(text)
    model = Model(len(tok.chars))
    key = jax.random.key(seed)
    k_init, k_adapter, k_drop = jax.random.split(key, 3)
    base = model.init(k_init, jnp.zeros((1, seq), jnp.int32))
    cfg = make_config(method, rank)
    print_fn(headline(method, rank, len(tok.chars), len(data), steps, batch, seq))
    mem = None
    if quantize:
        qbase = pj.quantize(base, scheme=quantize)
        mem = (weight_bytes(base), weight_bytes(qbase))
        print_fn(
            f"quantized the base ({quantize}): weights {mem[0]:,d} -> {mem[1]:,d} bytes "
            f"({mem[0] / mem[1]:.1f}x smaller)"
        )
        base_for_adapter = qbase
    else:
        base_for_adapter = base
    params = pj.inject(base_for_adapter, cfg, key=k_adapter)
    pj.print_trainable_parameters(params, print_fn=print_fn)

    lr = lr if lr is not None else demos()[method][2]
    opt = optax.adam(lr)
    trainable, frozen = pj.partition(params)
    opt_state = opt.init(trainable)
    prompt = cfg.route is not None  # prompt learning: no merge; inputs from `pj.prompt_inputs`
    if prompt:
        fwd = pj.apply(lambda p, b: model.apply(p, **b))

        def forward(p, x):  # the logits of the real tokens (virtual ones, if any, come first)
            return fwd(p, pj.prompt_inputs(p, x, model=model))[:, -x.shape[1] :]
    else:
        forward = pj.apply(model.apply)

    def loss_fn(trainable, frozen, x, y):
        logits = forward(pj.combine(trainable, frozen), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(trainable, frozen, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    eval_x, eval_y = next(batches(data, 32, seq, seed + 1))
    eval_loss = jax.jit(loss_fn)
    loss0 = float(eval_loss(trainable, frozen, eval_x, eval_y))
    print_fn(f"held-out loss before: {loss0:.3f}")
    bar = Progress(steps)
    it = batches(data, batch, seq, seed)
    losses = []
    tokens = 0
    for step in range(1, steps + 1):
        x, y = next(it)
        trainable, opt_state, loss = train_step(trainable, frozen, opt_state, x, y)
        tokens += x.size
        if step == 1:  # do not count compilation in tokens/s
            jax.block_until_ready(loss)
            bar.t0, tokens = time.perf_counter(), 0
        losses.append(loss)
        if step % 10 == 0 or step == steps:
            bar.update(step, float(loss), tokens)
    bar.close()
    params = pj.combine(trainable, frozen)
    loss1 = float(eval_loss(trainable, frozen, eval_x, eval_y))
    print_fn(f"held-out loss after:  {loss1:.3f}  (before {loss0:.3f})")

    y_adapted = jax.jit(forward)(params, eval_x)
    y_base = jax.jit(model.apply)(base, eval_x)
    moved = float(jnp.max(jnp.abs(y_adapted - y_base)))
    if prompt:
        merged, diff = None, float("nan")
        print_fn(
            f"{cfg.method} acts on the activations and does not merge (PEFT's rule); the "
            f"adapter moved logits by {moved:.2f}"
        )
        sample = generate(lambda x: forward(params, x), tok, "The ", 60, seq)
        print_fn(f"sample from the adapted model: {sample!r}")
    else:
        merged = pj.merge_and_unload(params)
        y_merged = jax.jit(model.apply)(merged, eval_x)
        diff = float(jnp.max(jnp.abs(y_adapted - y_merged)))
        print_fn(
            f"merged model vs adapted forward: max |diff| = {diff:.2e} "
            f"(adapter moved logits by {moved:.2f})"
        )
        sample = generate(lambda x: model.apply(merged, x), tok, "The ", 60, seq)
        print_fn(f"sample from the merged model: {sample!r}")
    result = {
        "loss_before": loss0,
        "loss_after": loss1,
        "train_losses": [float(l) for l in losses],
        "merge_diff": diff,
        "moved": moved,
        "params": params,
        "merged": merged,
        "sample": sample,
        "memory": mem,
    }
    if out:
        from .io import save_pretrained

        save_pretrained(params, out)
        print_fn(f"adapter saved to {out}/ (adapter_model.safetensors + adapter_config.json)")
        result["out"] = out
    return result


def weight_bytes(params) -> int:
    """Bytes of every array of ``params`` (a `pj.Quantized` weight: its packed arrays)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def generate(logits_of, tok, prompt: str, n: int, seq: int) -> str:
    """Greedy decoding with ``logits_of(ids [1, seq]) -> [1, seq, vocab]`` (the merged model,
    or the adapted forward of a method that does not merge)."""
    ids = list(tok.encode(prompt))
    fwd = jax.jit(logits_of)
    for _ in range(n):
        ctx = ids[-seq:]
        x = np.zeros((1, seq), np.int32)
        x[0, : len(ctx)] = ctx
        logits = fwd(x)
        ids.append(int(jnp.argmax(logits[0, len(ctx) - 1])))
    return tok.decode(ids)
