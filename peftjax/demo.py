"""The main job: adapt a small pretrained Llama-style Flax model to two styles of shipped text.

``peftjax demo`` (or ``python -m peftjax demo``) loads the char-level base shipped in
``peftjax/data/demo_base.safetensors`` (no network; pretrained on the shipped prose
``corpus_train.txt`` by ``scripts/pretrain_base.py``, whose command and seed
``demo_base.json`` records), prints its held-out loss on the two styles, injects two adapters
(LoRA by default) and trains ``A`` on a fixed verse form and ``B`` on sums (``12+7=19``), one at
a time with `pj.set_active`, the factored forward (`pj.apply`) and `pj.partition` (gradients and
optimizer state for the active adapter only). It then prints the held-out losses of the base,
A and B on both styles, a sample of each from the same prompt and seed, merges A
(`pj.merge_and_unload`) and checks that the merged model gives the adapted outputs, and saves
both adapters in HF PEFT's format (``<out>/A/``, ``<out>/B/``), loading A back to check it.
Prompt methods (``--method prompt_tuning``, ``prefix_tuning``) go through `pj.prompt_inputs`
(the model takes ``prefix_key_values``) and do not merge (PEFT's rule).
"""

from __future__ import annotations

import math
import sys
import textwrap
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
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    inter: int = 256

    @nn.compact
    def __call__(self, input_ids, prefix_key_values=None):
        """Logits of ``input_ids``; ``prefix_key_values``: one ``(keys, values)`` pair per
        layer (prefix tuning, see `Attention`)."""
        return TinyLlama(
            self.vocab, self.hidden, self.layers, self.heads, self.inter, name="model"
        )(input_ids, prefix_key_values)


# ------------------------------------------------------------------------------------ data

#: the two adapters of the demo: ``{adapter name: (style, what it is)}``; each style has a
#: ``<style>_train.txt`` and a ``<style>_heldout.txt`` under ``peftjax/data/``
ADAPTERS = {"A": ("verse", "a fixed verse form"), "B": ("sums", "one sum a line, 12+7=19")}
BASE_WEIGHTS = "data/demo_base.safetensors"
BASE_META = "data/demo_base.json"


def data_file(name: str):
    """A file shipped under ``peftjax/data/`` (package data, found with importlib.resources)."""
    return resources.files("peftjax").joinpath(f"data/{name}")


def load_corpus() -> str:
    """The hand-written paragraph text (``tiny_corpus.txt``; part of the base's corpus)."""
    return data_file("tiny_corpus.txt").read_text("utf-8")


def load_text(style: str, split: str) -> str:
    """``style``: ``corpus`` (the base's pretraining prose), ``verse`` or ``sums``; ``split``:
    ``train`` or ``heldout``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}")
    return data_file(f"{style}_{split}.txt").read_text("utf-8")


class CharTokenizer:
    """One id per character, the characters sorted (``chars``: the vocabulary)."""

    def __init__(self, text: str = "", chars=None):
        self.chars = list(chars) if chars is not None else sorted(set(text))
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


def eval_windows(data: np.ndarray, n: int, seq: int):
    """``n`` evenly spread ``(inputs, targets)`` windows of ``data`` (a fixed held-out set)."""
    starts = np.linspace(0, len(data) - seq - 1, n).astype(int)
    x = np.stack([data[s : s + seq + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


def flatten_params(params) -> dict[str, np.ndarray]:
    """A linen params tree as ``{"model.layers_0.self_attn.q_proj.kernel": array}``."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
        out[".".join(str(k.key) for k in path)] = np.asarray(x)
    return out


def unflatten_params(flat) -> dict:
    tree: dict = {}
    for key, x in flat.items():
        *mods, leaf = key.split(".")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(x)
    return {"params": tree}


def load_base():
    """``(model, params, tokenizer, meta)`` of the shipped pretrained base
    (``demo_base.safetensors`` + ``demo_base.json``, made by ``scripts/pretrain_base.py``)."""
    import json

    from safetensors.numpy import load

    meta = json.loads(data_file("demo_base.json").read_text("utf-8"))
    params = unflatten_params(load(data_file("demo_base.safetensors").read_bytes()))
    cfg = meta["model"]
    model = Model(cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["inter"])
    return model, params, CharTokenizer(chars=meta["vocab"]), meta


# ------------------------------------------------------------------------------------ progress


def progress_bar(console=None):
    """A `rich.progress.Progress` for training: step, loss and tokens/s. ``console``: default
    one on the current `sys.stderr` (looked up per bar: pytest's capture or a notebook may have
    replaced the one seen at import). Off a terminal, rich prints the bar once, when it stops."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr) if console is None else console
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("step {task.completed:>4.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:6.3f}"),
        TextColumn("{task.fields[tps]:>9,.0f} tok/s"),
        TimeElapsedColumn(),
        console=console,
    )


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
    styles = " and ".join(f"{n} on {s}" for n, (s, _) in ADAPTERS.items())
    return (
        f"peftjax demo: two {method}{ranked} adapters ({styles}) on a {vocab}-symbol "
        f"Llama-style model pretrained from random weights on {chars:,} characters of shipped "
        f"prose, {steps} steps each, batch {batch}x{seq}"
    )


def run(
    method: str = "lora",
    rank: int = 8,
    steps: int = 150,
    lr: float | None = None,
    batch: int = 16,
    seq: int = 64,
    out: str | None = "peftjax-demo-adapter",
    seed: int = 0,
    print_fn=print,
    quantize: str | None = None,
    progress: bool = True,
    sample_chars: int = 150,
) -> dict:
    """Run the demo; returns a dict of measurements (used by the tests).

    Loads the shipped pretrained base, fine-tunes adapter ``A`` on the verse style and ``B`` on
    the sums (`ADAPTERS`), ``steps`` steps each, prints the held-out losses of the base, A and
    B on both styles, a sample of each, merges A and checks it, and saves both adapters in HF
    PEFT's format under ``out`` (``out/A/``, ``out/B/``; PEFT's layout for named adapters),
    loading A back to check it. ``quantize``: ``"nf4"`` or ``"int8"`` quantizes the base before
    injecting (QLoRA, `pj.quantize`) and prints the weights' memory before and after.
    ``progress``: show the training bars (on stderr)."""
    import peftjax as pj

    t_start = time.perf_counter()
    model, base, tok, meta = load_base()
    corpus_chars = len(load_text("corpus", "train"))
    styles = {
        s: (tok.encode(load_text(s, "train")), tok.encode(load_text(s, "heldout")))
        for s, _ in ADAPTERS.values()
    }
    held = {s: eval_windows(h, 32, seq) for s, (_, h) in styles.items()}
    cfg = make_config(method, rank)
    print_fn(headline(method, rank, len(tok.chars), corpus_chars, steps, batch, seq))
    print_fn(
        f"base: peftjax/{BASE_WEIGHTS} ({meta['model']['layers']} layers, hidden "
        f"{meta['model']['hidden']}, {weight_count(base):,d} weights), made by "
        f"`{meta['command']}`"
    )
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
    key = jax.random.key(seed)
    params = base_for_adapter
    for name, k in zip(ADAPTERS, jax.random.split(key, len(ADAPTERS))):
        params = pj.inject(params, cfg, key=k, name=name)
    pj.print_trainable_parameters(pj.set_active(params, "A"), print_fn=print_fn)

    lr = lr if lr is not None else demos()[method][2]
    opt = optax.adam(lr)
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

    eval_jit = jax.jit(loss_fn)

    def held_losses(p) -> dict[str, float]:
        t, f = pj.partition(p)
        return {s: float(eval_jit(t, f, x, y)) for s, (x, y) in held.items()}

    table = {"base": held_losses(pj.set_active(params, None))}
    print_fn(
        "held-out loss of the base: "
        + ", ".join(f"{s} {l:.3f}" for s, l in table["base"].items())
        + " (nats per character)"
    )
    train_losses = {}
    bar = progress_bar() if progress else None
    if bar is not None:
        bar.start()
    try:
        for i, (name, (style, _)) in enumerate(ADAPTERS.items()):
            params = pj.set_active(params, name)
            trainable, frozen = pj.partition(params)
            opt_state = opt.init(trainable)
            task = None
            if bar is not None:
                task = bar.add_task(f"{name} ({style})", total=steps, loss=float("nan"), tps=0.0)
            it = batches(styles[style][0], batch, seq, seed + 10 * (i + 1))
            losses, tokens, t0 = [], 0, time.perf_counter()
            for step in range(1, steps + 1):
                x, y = next(it)
                trainable, opt_state, loss = train_step(trainable, frozen, opt_state, x, y)
                tokens += x.size
                if step == 1:  # do not count compilation in tokens/s
                    jax.block_until_ready(loss)
                    t0, tokens = time.perf_counter(), 0
                losses.append(loss)
                if bar is not None and (step % 10 == 0 or step == steps):
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, completed=step, loss=float(loss), tps=tokens / dt)
            params = pj.combine(trainable, frozen)
            train_losses[name] = [float(l) for l in losses]
    finally:
        if bar is not None:
            bar.stop()
    for name in ADAPTERS:
        table[name] = held_losses(pj.set_active(params, name))
    print_fn("held-out loss (nats per character), lower is better:")
    cols = list(held)
    print_fn("  " + "model".ljust(22) + "".join(c.rjust(9) for c in cols))
    for row, row_losses in table.items():
        label = "base" if row == "base" else f"{row} ({method} on {ADAPTERS[row][0]})"
        print_fn("  " + label.ljust(22) + "".join(f"{row_losses[c]:9.3f}" for c in cols))

    # switch adapters: the same prompt and sampling seed through the base, A and B
    fwd_jit = jax.jit(forward)
    prompt_text = "\n"
    samples = {}
    for row in table:
        p = pj.set_active(params, None if row == "base" else row)
        samples[row] = generate(
            lambda x, p=p: fwd_jit(p, x), tok, prompt_text, sample_chars, seq, seed=seed
        )
    print_fn(f"samples (pj.set_active; the same prompt {prompt_text!r} and sampling seed):")
    for row, text in samples.items():
        label = "base" if row == "base" else f"{row} ({ADAPTERS[row][0]})"
        print_fn(f"  [{label}]")
        for line in text.strip("\n").split("\n")[:6]:
            for part in textwrap.wrap(line, 88) or [""]:
                print_fn(f"    | {part}".rstrip())

    eval_x = held[ADAPTERS["A"][0]][0]
    p_a = pj.set_active(params, "A")
    y_adapted = fwd_jit(p_a, eval_x)
    y_base = fwd_jit(pj.set_active(params, None), eval_x)
    moved = float(jnp.max(jnp.abs(y_adapted - y_base)))
    if prompt:
        merged, diff = None, None
        print_fn(
            f"{cfg.method} acts on the activations and does not merge (PEFT's rule); adapter A "
            f"moved logits by {moved:.2f}"
        )
    else:
        merged = pj.merge_and_unload(params, ["A"])
        y_merged = jax.jit(model.apply)(merged, eval_x)
        diff = float(jnp.max(jnp.abs(y_adapted - y_merged)))
        print_fn(
            f"merged A into the base (pj.merge_and_unload): max |merged - adapted| logits = "
            f"{diff:.2e} (A moved logits by {moved:.2f})"
        )
    result = {
        "loss_before": float(np.mean([table["base"][s] for s, _ in ADAPTERS.values()])),
        "loss_after": float(np.mean([table[n][s] for n, (s, _) in ADAPTERS.items()])),
        "losses": table,
        "train_losses": train_losses,
        "merge_diff": diff,
        "moved": moved,
        "params": params,
        "merged": merged,
        "samples": samples,
        "sample": samples["A"],
        "memory": mem,
        "reload_diff": None,
    }
    if out:
        for name in ADAPTERS:
            pj.save_pretrained(params, out, name=name)
        loaded = pj.load_pretrained(base_for_adapter, out, name="A")
        result["reload_diff"] = float(jnp.max(jnp.abs(fwd_jit(loaded, eval_x) - y_adapted)))
        peft_type = pj.read_adapter(out, "A")[0].peft_type
        print_fn(
            f"saved A and B in HF PEFT's format to {out}/A/ and {out}/B/ "
            f"(adapter_model.safetensors + adapter_config.json, {peft_type}); A loaded back "
            f"with pj.load_pretrained: max |diff| = {result['reload_diff']:.1e}"
        )
        result["out"] = out
    result["seconds"] = time.perf_counter() - t_start
    print_fn(f"done in {result['seconds']:.0f} s")
    return result


def demo_ok(res: dict) -> bool:
    """Each adapter beats the base on its own style, the merge and the reload match."""
    table = res["losses"]
    better = all(table[n][s] < table["base"][s] for n, (s, _) in ADAPTERS.items())
    merged = res["merge_diff"] is None or res["merge_diff"] < 1e-3
    reloaded = res["reload_diff"] is None or res["reload_diff"] < 1e-3
    return better and merged and reloaded


def weight_bytes(params) -> int:
    """Bytes of every array of ``params`` (a `pj.Quantized` weight: its packed arrays)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def weight_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def generate(
    logits_of, tok, prompt: str, n: int, seq: int, *, temperature: float = 0.5, seed: int = 0
) -> str:
    """``n`` characters sampled after ``prompt`` with ``logits_of(ids [1, seq]) -> [1, seq,
    vocab]`` (the merged model, or an adapted forward); ``temperature`` 0: greedy."""
    ids = list(tok.encode(prompt))
    key = jax.random.key(seed)
    for i in range(n):
        ctx = ids[-seq:]
        x = np.zeros((1, seq), np.int32)
        x[0, : len(ctx)] = ctx
        logits = logits_of(x)[0, len(ctx) - 1]
        if temperature > 0:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
        else:
            nxt = jnp.argmax(logits)
        ids.append(int(nxt))
    return tok.decode(ids)
