"""Benchmark matrix (issue 8): what a peftjax adapter step costs on every model and target,
against the model's own floor and full fine-tuning, side by side in one process.

Models (hidden 256, 4 layers, intermediate 1024, 4 heads, batch 8 x seq 128, vocab 1000, float32,
random init, nothing downloaded; ``--quick``: hidden 64, 2 layers, intermediate 256, batch 2 x 32):
  * ``llama``: transformers' FlaxLlamaForCausalLM (``_common.flax_llama``), next-token CE.
  * ``bert``:  transformers' FlaxBertModel, MSE of ``last_hidden_state`` vs a fixed random target.
  * ``gpt2``:  transformers' FlaxGPT2LMHeadModel, next-token CE; its Conv1D kernels are stored
               ``(out, in)``: injected with ``layouts={c_attn|c_proj|c_fc: Layout("dense",
               transposed=True)}``.
  * ``mlp``:   a linen MLP, 4 residual blocks ``x + fc2(relu(fc1(x)))`` (256 -> 1024 -> 256) on
               ``(8, 128, 256)`` inputs, MSE.
  * ``nnx``:   the nnx Llama-style model (``_common.nnx_llama``): ``nnx.split`` + ``pj.inject`` on
               the state + ``pj.apply(lambda st, ids: nnx.merge(graphdef, st)(ids))``, next-token CE.
  * ``scan``:  a linen Llama-ish model whose 4 blocks are one ``nn.scan`` (kernels stacked
               ``(L, in, out)``, injected with ``layouts={r"layers\\..*": Layout("dense",
               stack=1)}``), next-token CE.

Targets: ``attention`` (q/k/v/o; BERT query/key/value/attention.output.dense; GPT-2
c_attn/attn.c_proj), ``mlp`` (gate/up/down; BERT intermediate.dense and the layer's
output.dense; GPT-2 c_fc/mlp.c_proj; the MLP model: all its Dense), ``all-linear`` (PEFT's rule;
peftjax leaves the lm_head out). The MLP model has no attention row.

Methods: LoRA r in {8, 64} (alpha 2r), DoRA r=8, LoKr r=8 (alpha 16), LoHa r=8 (alpha 16), IA3
(``feedforward_modules`` = the down-projection-like modules when they are targeted, else None).
Every trainable adapter array that its init leaves all-zero (LoRA B, LoKr w1, LoHa w2_b, nnx /
qwix LoRA b) gets small random values, so nothing is trivially zero.

Per model, compiled once (AOT ``lower().compile()``) and re-timed in every row:
  * floor: ``jax.grad`` w.r.t. a scalar ``s`` (1.0) that multiplies the input: the embedding
    table (GPT-2: the position table ``wpe``, because ``wte`` is tied to the LM head and scaling
    it would add the head's weight gradient), the MLP model's input activations. That is
    forward + the input-gradient backward through every layer, no weight gradient.
  * full fine-tuning: ``jax.grad`` w.r.t. all params.
Per row, the peftjax step = ``jax.jit(jax.grad(loss))`` w.r.t. ``pj.partition``'s trainable
part through ``pj.apply`` (gradient only, no optimizer, like floor and full FT). The three (and,
on nnx LoRA rows, ``nnx.LoRALinear`` and qwix on the same modules) run round-robin
(``_common.round_robin``), so the time ratios are side by side.

Columns:
  * ``÷ floor``, ``÷ full``: median-time ratios of the step.
  * ``÷ (floor+A)``: step time ÷ ``floor time · (1 + A / floor FLOPs)``, i.e. against the floor
    plus the adapters' analytic work at the floor's own FLOP rate: ~1.0 means the step costs
    the floor plus the adapters' own work.
  * ``ΔGF``: XLA FLOPs of the step minus the floor's, in GFLOP. The step used here is grad w.r.t.
    ``(trainable, s)``, compiled for the cost analysis only: with grad w.r.t. the trainable part
    alone, layer 0's input gradient (through frozen weights) is dead code and the step can be
    *below* the floor (see flops_memory.py, note 1). ``÷ A``: ``ΔGF`` ÷ the analytic A.
  * ``mem ÷ floor``: compiled peak (``memory_analysis`` args + out + temp − alias) of the timed
    step ÷ the floor's.
  * ``nnx ÷``, ``qwix ÷``: peftjax step time ÷ the nnx.LoRALinear / qwix step on the same model,
    modules and rank (nnx rows, LoRA only); < 1 means peftjax is faster.
  * ``ok``: LoRA: ``÷ floor ≤ 1.10`` and ``÷ full < 1`` (the issue's targets); other methods:
    ``÷ (floor+A) ≤ 1.10`` and ``÷ A ≤ 1.25`` or ``ΔGF`` under 1 % of the floor's (within their own analytic bound; XLA also counts
    the elementwise ops the analytic formulas leave out).

Analytic adapter FLOPs A per step (forward + backward; T tokens, one module with matrix view
``(in, out)``, summed over modules and, for scanned layers, over the L stacked layers):
  * LoRA: ``6·T·r·(in+out)``: forward ``x@A@B`` is ``2·T·r·(in+out)``, backward (grads w.r.t.
    x@A, A, B and the input) twice that.
  * DoRA: LoRA's + ``6·T·out`` (the per-column rescale ``(g-1)·y + g·s·xAB``, forward and
    backward) + ``2·in·out·r + 4·in·out`` per step for the weight norm ``||W + s·A·B||`` (under
    ``stop_gradient``: forward only).
  * LoKr (``linear_forward``: ``x (T, c, d) @ w2 (d, b)`` then ``@ w1 (c, a)``, in = c·d,
    out = a·b): ``6·T·c·b·(d + a)``, plus ``6·d·r·b`` when w2 is the product ``w2_b @ w2_a``.
  * LoHa (``linear_forward`` builds ``dW = (w1_b@w1_a)·(w2_b@w2_a)·s`` per module, then
    ``x @ dW``): ``6·T·in·out`` (forward matmul, its input and dW gradients) +
    ``12·in·out·r`` (two rank-r products and their gradients) + ``4·in·out`` (elementwise).
  * IA3: ``3·T·n``, n = out (output scaling) or in (feedforward: input scaling; the base matmul
    then runs on the scaled input, so it adds no matmul).
BERT's pooler is adapted by ``all-linear`` but its output is not in the loss: it counts 0.
Scanned model: XLA's cost analysis counts a while loop's body once, so its FLOPs of the blocks
are per layer; there the A, ``÷ A`` and ``÷ (floor+A)`` columns use ``A / L``.

Unmerged inference (per model, LoRA r=16 on all-linear, random B): jit'd ``pj.apply(fwd)(params)``
vs ``fwd(pj.merge_and_unload(params))``, round-robin; target ``÷ merged ≤ 1.05``.

Run from the repository root:
  python benchmarks/matrix.py [--quick] [--models llama,bert,gpt2,mlp,nnx,scan]
      [--methods lora,dora,lokr,loha,ia3] [--targets attention,mlp,all-linear] [--reps N]
      [--budget SEC] [--no-qwix] [--no-inference] [--out results.md]
``--budget`` is seconds of timed rounds per row (at least 4 rounds each); ``--reps`` the most
(defaults: 12 rounds / 2.5 s, ``--quick`` 4 / 0.3 s). ``--quick`` alone runs a smoke subset
(``QUICK_ROWS``: LoRA r=8 on every model, DoRA, LoHa, IA3 (feedforward) and LoKr once each);
with ``--methods``, ``--targets`` or ``--ranks`` it runs their full cross product at quick sizes.
Timings go to stdout (markdown) and progress to stderr.
A row that fails to build or run prints ``error: <message>`` in its table; the script goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

import peftjax as pj
from peftjax._tree import keypath_to_names

# --quick (without --methods/--targets/--ranks): LoRA r=8 on all-linear on every model (the nnx
# model, with its nnx.LoRALinear and qwix peers: on the MLP modules), plus each other method once
# on a smaller target (IA3 on the MLP target, so that its feedforward path runs)
QUICK_ROWS = {
    "llama": [("all-linear", "lora", 8), ("attention", "dora", 8)],
    "bert": [("all-linear", "lora", 8)],
    "gpt2": [("all-linear", "lora", 8), ("attention", "loha", 8)],
    "mlp": [("all-linear", "lora", 8), ("mlp", "ia3", None)],
    "nnx": [("mlp", "lora", 8)],
    "scan": [("all-linear", "lora", 8), ("attention", "lokr", 8)],
}
MODELS = ("llama", "bert", "gpt2", "mlp", "nnx", "scan")
METHODS = ("lora", "dora", "lokr", "loha", "ia3")
TARGETS = ("attention", "mlp", "all-linear")
LLAMA_ATTN = list(C.ATTN)
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------ helpers


def path_str(path) -> str:
    """``a/b/0/kernel`` for a jax key path, with peftjax's own key-path segments."""
    return "/".join(keypath_to_names(path))


def scale_leaf(tree, pattern: str, s):
    """``tree`` with every leaf whose path matches ``pattern`` (re.search) multiplied by ``s``."""
    rx = re.compile(pattern)
    hit = []

    def f(path, x):
        if rx.search(path_str(path)):
            hit.append(path_str(path))
            return x * s
        return x

    out = jax.tree_util.tree_map_with_path(f, tree)
    if not hit:
        raise KeyError(f"no leaf matches {pattern!r} to scale")
    return out


def randomize_zeros(tree, seed, scale=0.02):
    """Every all-zero float leaf of ``tree`` replaced by ``scale`` x N(0, 1) (a plain pytree)."""
    rng = np.random.default_rng(seed)
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    out = []
    for x in leaves:
        h = np.asarray(x)
        if np.issubdtype(h.dtype, np.floating) and h.size and not h.any():
            x = jnp.asarray(scale * rng.standard_normal(h.shape), x.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(tdef, out)


def randomize_adapters(params, seed):
    t, f = pj.partition(params)
    return pj.combine(randomize_zeros(t, seed), f)


def short_error(e: BaseException, n=160) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def blocking(compiled, *args):
    def run():
        jax.block_until_ready(compiled(*args))

    return run


def mse(y, target):
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


# ------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class Bench:
    name: str
    desc: str
    params: Any  # the tree pj.inject sees
    fwd: Callable  # fwd(params, batch) -> output
    loss_out: Callable  # loss_out(output, batch) -> scalar
    batch: Any
    tokens: int
    scale: Callable  # scale(params, batch, s) -> (params, batch): the floor's input scale
    targets: dict  # target name -> target_modules
    ff: dict  # target name -> IA3 feedforward_modules
    layouts: Any = None
    dead: str | None = None  # regex of module paths whose output the loss never uses
    nnx_shape: dict | None = None  # nnx model: the shape kwargs of _common.nnx_llama
    nnx_modules: dict | None = None  # nnx model: target name -> module names
    # XLA's cost analysis counts a while loop's body once: on the scanned model the XLA FLOPs of
    # the blocks are per layer, so the analytic A is divided by this for the FLOP columns
    loop_trips: int = 1

    def loss(self, params, batch):
        return self.loss_out(self.fwd(params, batch), batch)


def sizes(quick):
    if quick:
        return dict(hidden=64, inter=256, layers=2, heads=4, vocab=1000, batch=2, seq=32)
    return dict(hidden=256, inter=1024, layers=4, heads=4, vocab=1000, batch=8, seq=128)


def _lm_targets(attn, mlp, down):
    return (
        {"attention": attn, "mlp": mlp, "all-linear": "all-linear"},
        {"attention": None, "mlp": down, "all-linear": down},
    )


def build_llama(z):
    cfg = C.llama_config(
        hidden=z["hidden"], inter=z["inter"], layers=z["layers"], heads=z["heads"], vocab=z["vocab"]
    )
    params, fwd = C.flax_llama(cfg)
    ids = C.random_ids(z["batch"], z["seq"], z["vocab"])
    tg, ff = _lm_targets(LLAMA_ATTN, LLAMA_MLP, ["down_proj"])
    return Bench(
        "llama",
        "transformers FlaxLlamaForCausalLM, next-token CE",
        params,
        fwd,
        lambda out, ids: C.lm_loss(out, ids),
        ids,
        z["batch"] * z["seq"],
        lambda p, b, s: (scale_leaf(p, r"embed_tokens/embedding$", s), b),
        tg,
        ff,
    )


def build_bert(z):
    from transformers import BertConfig, FlaxBertModel

    cfg = BertConfig(
        hidden_size=z["hidden"],
        num_hidden_layers=z["layers"],
        intermediate_size=z["inter"],
        num_attention_heads=z["heads"],
        vocab_size=z["vocab"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    m = FlaxBertModel(cfg, seed=0, input_shape=(1, 8))
    module = m.module
    ids = C.random_ids(z["batch"], z["seq"], z["vocab"])
    target = jnp.asarray(
        np.random.default_rng(1).normal(size=(z["batch"], z["seq"], z["hidden"])), jnp.float32
    )

    def fwd(params, ids):
        b, s = ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out = module.apply(
            {"params": params}, ids, jnp.ones_like(ids), jnp.zeros_like(ids), pos, return_dict=False
        )
        return out[0]

    mlp = r".*layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense
    return Bench(
        "bert",
        "transformers FlaxBertModel, MSE of last_hidden_state vs a fixed random target",
        m.params,
        fwd,
        lambda out, ids: mse(out, target),
        ids,
        z["batch"] * z["seq"],
        lambda p, b, s: (scale_leaf(p, r"word_embeddings/embedding$", s), b),
        {
            "attention": ["query", "key", "value", "attention.output.dense"],
            "mlp": mlp,
            "all-linear": "all-linear",
        },
        {
            "attention": None,
            "mlp": r".*layer\.\d+\.output\.dense",
            "all-linear": r".*layer\.\d+\.output\.dense",
        },
        dead=r"pooler",
    )


def build_gpt2(z):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(
        n_embd=z["hidden"],
        n_layer=z["layers"],
        n_head=z["heads"],
        n_inner=z["inter"],
        vocab_size=z["vocab"],
        n_positions=max(z["seq"], 128),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    m = FlaxGPT2LMHeadModel(cfg, seed=0, input_shape=(1, 8))
    module = m.module
    ids = C.random_ids(z["batch"], z["seq"], z["vocab"])

    def fwd(params, ids):
        b, s = ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return module.apply({"params": params}, ids, jnp.ones_like(ids), pos, return_dict=False)[0]

    t = pj.Layout("dense", transposed=True)
    tg, ff = _lm_targets(["c_attn", "attn.c_proj"], ["c_fc", "mlp.c_proj"], ["mlp.c_proj"])
    return Bench(
        "gpt2",
        "transformers FlaxGPT2LMHeadModel (Conv1D kernels (out, in), transposed layout), "
        "next-token CE",
        m.params,
        fwd,
        lambda out, ids: C.lm_loss(out, ids),
        ids,
        z["batch"] * z["seq"],
        # wte is tied to the LM head: scale the position table instead (input gradient only)
        lambda p, b, s: (scale_leaf(p, r"wpe/embedding$", s), b),
        tg,
        ff,
        layouts={"c_attn": t, "c_proj": t, "c_fc": t},
    )


def build_mlp(z):
    from flax import linen as nn

    d, h, n = z["hidden"], z["inter"], z["layers"]

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(d, name="fc2")(nn.relu(nn.Dense(h, name="fc1")(x)))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(n):
                x = Block(name=f"blocks_{i}")(x)
            return x

    model = MLP()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(z["batch"], z["seq"], d)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(z["batch"], z["seq"], d)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    return Bench(
        "mlp",
        f"linen MLP, {n} residual blocks x + fc2(relu(fc1(x))) ({d} -> {h} -> {d}), MSE",
        params,
        lambda p, b: model.apply(p, b[0]),
        lambda out, b: mse(out, b[1]),
        (x, y),
        z["batch"] * z["seq"],
        lambda p, b, s: (p, (b[0] * s, b[1])),
        {"mlp": ["fc1", "fc2"], "all-linear": "all-linear"},
        {"mlp": ["fc2"], "all-linear": ["fc2"]},
    )


def _nnx_shape(z):
    return dict(
        hidden=z["hidden"], inter=z["inter"], layers=z["layers"], heads=z["heads"], vocab=z["vocab"]
    )


def build_nnx(z):
    from flax import nnx

    shape = _nnx_shape(z)
    gdef, state = nnx.split(C.nnx_llama(**shape))
    ids = C.random_ids(z["batch"], z["seq"], z["vocab"])
    tg, ff = _lm_targets(LLAMA_ATTN, LLAMA_MLP, ["down_proj"])
    return Bench(
        "nnx",
        "nnx Llama-style model (_common.nnx_llama), nnx.split + pj.inject on the state, "
        "next-token CE",
        state,
        lambda st, ids: nnx.merge(gdef, st)(ids),
        lambda out, ids: C.lm_loss(out, ids),
        ids,
        z["batch"] * z["seq"],
        lambda p, b, s: (scale_leaf(p, r"embed_tokens/embedding", s), b),
        tg,
        ff,
        nnx_shape=shape,
        nnx_modules={
            "attention": LLAMA_ATTN,
            "mlp": LLAMA_MLP,
            "all-linear": LLAMA_ATTN + LLAMA_MLP,
        },
    )


def build_scan(z):
    from flax import linen as nn

    d, h, nh, L, V = z["hidden"], z["inter"], z["heads"], z["layers"], z["vocab"]

    class RMS(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            b, t, _d = x.shape
            hd = d // nh
            a = RMS(name="input_norm")(x)
            q = nn.Dense(d, use_bias=False, name="q_proj")(a).reshape(b, t, nh, hd)
            k = nn.Dense(d, use_bias=False, name="k_proj")(a).reshape(b, t, nh, hd)
            v = nn.Dense(d, use_bias=False, name="v_proj")(a).reshape(b, t, nh, hd)
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
            att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
            o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
            x = x + nn.Dense(d, use_bias=False, name="o_proj")(o)
            m = RMS(name="post_norm")(x)
            g = nn.Dense(h, use_bias=False, name="gate_proj")(m)
            u = nn.Dense(h, use_bias=False, name="up_proj")(m)
            return x + nn.Dense(d, use_bias=False, name="down_proj")(jax.nn.silu(g) * u), None

    Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(V, d, name="embed")(ids)
            x, _ = Stack(name="layers")(x, None)
            return nn.Dense(V, use_bias=False, name="lm_head")(RMS(name="norm")(x))

    model = LM()
    ids = C.random_ids(z["batch"], z["seq"], V)
    params = model.init(jax.random.key(0), ids)
    tg, ff = _lm_targets(LLAMA_ATTN, LLAMA_MLP, ["down_proj"])
    return Bench(
        "scan",
        f"linen Llama-ish model, {L} blocks in one nn.scan (kernels (L, in, out), "
        "Layout('dense', stack=1)), next-token CE",
        params,
        model.apply,
        lambda out, ids: C.lm_loss(out, ids),
        ids,
        z["batch"] * z["seq"],
        lambda p, b, s: (scale_leaf(p, r"embed/embedding$", s), b),
        tg,
        ff,
        layouts={r"layers\..*": pj.Layout("dense", stack=1)},
        loop_trips=L,
    )


BUILDERS = dict(
    llama=build_llama,
    bert=build_bert,
    gpt2=build_gpt2,
    mlp=build_mlp,
    nnx=build_nnx,
    scan=build_scan,
)


# ------------------------------------------------------------------------------------ analytic


def adapter_groups(trainable):
    """``{module path: {array name: shape}}`` from a partitioned trainable tree."""
    groups = {}
    for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        s = path_str(path)
        if "/arrays/" not in s:
            continue
        mod, rest = s.split("/arrays/", 1)
        groups.setdefault(mod, {})[rest.split("/")[-1]] = tuple(x.shape)
    return groups


def analytic_flops(method, trainable, tokens, dead=None):
    """Analytic adapter FLOPs per step (see the module docstring), summed over modules."""
    total = 0
    for mod, d in adapter_groups(trainable).items():
        T = 0 if dead and re.search(dead, mod) else tokens
        if method in ("lora", "dora"):
            a, b = d["lora_A"], d["lora_B"]
            L = math.prod(a[:-2])
            n_in, r, n_out = a[-2], a[-1], b[-1]
            f = 6 * T * r * (n_in + n_out)
            if method == "dora":
                f += 6 * T * n_out + 2 * n_in * n_out * r + 4 * n_in * n_out
        elif method == "lokr":
            if "lokr_w1" in d:
                c, a_ = d["lokr_w1"][-2:]
                L = math.prod(d["lokr_w1"][:-2])
            else:
                c, a_ = d["lokr_w1_b"][-2], d["lokr_w1_a"][-1]
                L = math.prod(d["lokr_w1_b"][:-2])
            extra = 0
            if "lokr_w2" in d:
                dd, b_ = d["lokr_w2"][-2:]
            else:
                dd, r = d["lokr_w2_b"][-2:]
                b_ = d["lokr_w2_a"][-1]
                extra = 6 * dd * r * b_
            f = 6 * T * c * b_ * (dd + a_) + extra
        elif method == "loha":
            w1b, w1a = d["hada_w1_b"], d["hada_w1_a"]
            L = math.prod(w1b[:-2])
            n_in, r, n_out = w1b[-2], w1b[-1], w1a[-1]
            f = 6 * T * n_in * n_out + 12 * n_in * n_out * r + 4 * n_in * n_out
        elif method == "ia3":
            l_ = d["ia3_l"]
            L = math.prod(l_[:-1])
            f = 3 * T * l_[-1]
        else:
            raise ValueError(method)
        total += L * f
    return total


# ------------------------------------------------------------------------------------ configs


def method_rows(methods, ranks):
    rows = []
    for m in methods:
        if m == "lora":
            rows += [("lora", r) for r in ranks]
        elif m == "ia3":
            rows.append(("ia3", None))
        else:
            rows.append((m, 8))
    return rows


def make_config(method, r, targets, ff):
    if method == "lora":
        return pj.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    if method == "dora":
        return pj.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=True)
    if method == "lokr":
        return pj.LoKrConfig(r=r, alpha=2 * r, target_modules=targets)
    if method == "loha":
        return pj.LoHaConfig(r=r, alpha=2 * r, target_modules=targets)
    if method == "ia3":
        return pj.IA3Config(target_modules=targets, feedforward_modules=ff)
    raise ValueError(method)


# ------------------------------------------------------------------------------------ nnx peers


def nnx_lora_entry(bench, modules, rank, key):
    """``(loss, trainable, rest, n_params)``: nnx_llama with ``modules`` as nnx.LoRALinear."""
    from flax import nnx

    m = C.nnx_llama(**bench.nnx_shape)
    rngs = nnx.Rngs(int(key))
    for blk in m.layers:
        for name in modules:
            parent = blk.self_attn if name in C.ATTN else blk
            old = getattr(parent, name)
            new = nnx.LoRALinear(
                old.in_features, old.out_features, lora_rank=rank, use_bias=False, rngs=rngs
            )
            new.kernel.value = old.kernel.value
            setattr(parent, name, new)
    gdef, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
    lora = randomize_zeros(lora, key)

    def loss(lora, rest, ids):
        return C.lm_loss(nnx.merge(gdef, lora, rest)(ids), ids)

    return loss, lora, rest, C.tree_size(lora)


def qwix_entry(bench, modules, rank, key):
    import qwix
    from flax import nnx

    base = C.nnx_llama(**bench.nnx_shape)
    provider = qwix.LoraProvider(
        module_path=".*(" + "|".join(modules) + ")", rank=rank, alpha=float(2 * rank)
    )
    qm = qwix.apply_lora_to_model(base, provider, bench.batch, rngs=nnx.Rngs(int(key)))
    gdef, lora, rest = nnx.split(qm, nnx.LoRAParam, ...)
    if not jax.tree_util.tree_leaves(lora):
        raise RuntimeError("qwix created no LoRA params")
    lora = randomize_zeros(lora, key)

    def loss(lora, rest, ids):
        return C.lm_loss(nnx.merge(gdef, lora, rest)(ids), ids)

    ver = getattr(qwix, "__version__", "?")
    return loss, lora, rest, C.tree_size(lora), ver


# ------------------------------------------------------------------------------------ run


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def run_model(bench, rows, args, log):
    """Markdown section for one model (header line, table, inference line)."""
    one = jnp.float32(1.0)
    p0, b0 = bench.params, bench.batch

    def loss_floor(s, p, b):
        p, b = bench.scale(p, b, s)
        return bench.loss(p, b)

    t0 = time.perf_counter()
    c_floor = C.compile_fn(jax.grad(loss_floor), one, p0, b0)
    c_full = C.compile_fn(jax.grad(bench.loss), p0, b0)
    f_floor, f_full = C.flops(c_floor), C.flops(c_full)
    m_floor, m_full = C.memory(c_floor)["peak"], C.memory(c_full)["peak"]
    run_floor, run_full = blocking(c_floor, one, p0, b0), blocking(c_full, p0, b0)
    run_floor(), run_full()
    log(f"# {bench.name}: floor + full FT compiled in {time.perf_counter() - t0:.1f}s")

    fwd_apply = pj.apply(bench.fwd)
    out_rows = []
    is_nnx = bench.nnx_shape is not None
    qwix_note = None
    floor_meds, full_meds = [], []
    for target, method, r in rows:
        if target not in bench.targets:
            continue
        label = [method, target, "-" if r is None else r]
        t_row = time.perf_counter()
        t_built = t_compiled = None
        try:
            cfg = make_config(method, r, bench.targets[target], bench.ff[target])
            q = pj.inject(p0, cfg, key=jax.random.key(1), layouts=bench.layouts)
            q = randomize_adapters(q, 2)
            t, f = pj.partition(q)
            n_train = C.tree_size(t)
            A = analytic_flops(method, t, bench.tokens, bench.dead)
            A_xla = A / bench.loop_trips  # what XLA's cost analysis can see of A

            def loss_t(t, f, b):
                return bench.loss_out(fwd_apply(pj.combine(t, f), b), b)

            def loss_ts(t, s, f, b):
                f, b = bench.scale(f, b, s)
                return bench.loss_out(fwd_apply(pj.combine(t, f), b), b)

            t_built = time.perf_counter()
            c_step = C.compile_fn(jax.grad(loss_t), t, f, b0)
            c_ts = C.compile_fn(jax.grad(loss_ts, argnums=(0, 1)), t, one, f, b0)
            f_ts = C.flops(c_ts)
            del c_ts
            m_step = C.memory(c_step)["peak"]
            entries = {"floor": run_floor, "full": run_full, "step": blocking(c_step, t, f, b0)}
            peers = {}
            if is_nnx and method == "lora":
                mods = bench.nnx_modules[target]
                try:
                    l_n, tn, rn, _ = nnx_lora_entry(bench, mods, r, 3)
                    c_n = C.compile_fn(jax.grad(l_n), tn, rn, b0)
                    entries["nnx"] = blocking(c_n, tn, rn, b0)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    peers["nnx"] = "error: " + short_error(e, 80)
                if not args.no_qwix:
                    try:
                        l_q, tq, rq, nq, ver = qwix_entry(bench, mods, r, 4)
                        c_q = C.compile_fn(jax.grad(l_q), tq, rq, b0)
                        entries["qwix"] = blocking(c_q, tq, rq, b0)
                        qwix_note = f"qwix {ver}"
                        if nq != n_train:
                            peers["qwix_n"] = f"qwix made {nq:,} LoRA params vs {n_train:,}"
                    except ImportError as e:
                        qwix_note = f"qwix not importable ({e}); skipped"
                        peers["qwix"] = "skipped"
                    except Exception as e:  # noqa: BLE001
                        peers["qwix"] = "error: " + short_error(e, 80)
            for k, fn in entries.items():
                if k not in ("floor", "full"):  # those two are warm from earlier rows
                    fn()
            t_compiled = time.perf_counter()
            med, _mn, n = C.round_robin(
                entries, reps=args.reps, warmup=0, budget_s=args.budget, pause=0.01
            )
            tf, tfull, ts = med["floor"], med["full"], med["step"]
            floor_meds.append(tf)
            full_meds.append(tfull)
            r_floor, r_full = ts / tf, ts / tfull
            r_fa = ts / (tf * (1 + A_xla / f_floor))
            d_gf = f_ts - f_floor
            r_a = d_gf / A_xla if A else None
            if method == "lora":
                # the issue's target is step <= 1.10x floor; where the adapters' own analytic
                # FLOPs exceed 10% of the floor's (r=64, or narrow layers) that bound is below
                # the work itself, so the row is judged against floor + analytic instead
                ok = r_full < 1.0 and (r_floor <= 1.10 or (A_xla > 0.1 * f_floor and r_fa <= 1.10))
            else:
                ok = r_fa <= 1.10 and (r_a is None or r_a <= 1.25 or d_gf < 0.01 * f_floor)
            nnx_col = f"{ts / med['nnx']:.2f}" if "nnx" in med else peers.get("nnx", "")
            qwix_col = f"{ts / med['qwix']:.2f}" if "qwix" in med else peers.get("qwix", "")
            if "qwix_n" in peers:
                qwix_col += f" ({peers['qwix_n']})"
            row = label + [
                f"{n_train:,}",
                f"{ts * 1e3:.1f}",
                fmt(r_floor),
                fmt(r_full),
                fmt(r_fa),
                C.gf(d_gf),
                C.gf(A_xla),
                fmt(r_a),
                fmt(m_step / m_floor),
            ]
            if is_nnx:
                row += [nnx_col, qwix_col]
            row += [("ok" if ok else "MISS") + f" ({min(n.values())} rds)"]
        except Exception as e:  # noqa: BLE001 - every failure is a table row
            if args.debug:
                traceback.print_exc()
            row = label + ["error: " + short_error(e)] + [""] * (9 + (2 if is_nnx else 0))
        out_rows.append(row)
        t_end = time.perf_counter()
        phases = ""
        if t_compiled:
            phases = (
                f" (build {t_built - t_row:.1f}s, compile + first call {t_compiled - t_built:.1f}s,"
                f" timed {t_end - t_compiled:.1f}s)"
            )
        log(f"#   {bench.name} {method} {target} r={r}: {t_end - t_row:.1f}s{phases}")

    headers = [
        "method",
        "target",
        "r",
        "trainable",
        "step ms",
        "÷ floor",
        "÷ full",
        "÷ (floor+A)",
        "ΔGF",
        "A GF",
        "÷ A",
        "mem ÷ floor",
    ]
    if is_nnx:
        headers += ["÷ nnx.LoRA", "÷ qwix"]
    headers += ["ok"]
    if floor_meds:  # the median over the rows' round-robins
        med = {"floor": float(np.median(floor_meds)), "full": float(np.median(full_meds))}
    else:
        med, _, _ = C.round_robin(
            {"floor": run_floor, "full": run_full},
            reps=args.reps,
            warmup=1,
            budget_s=args.budget,
            min_sample_s=0.05,
        )
    lines = [
        f"\n## {bench.name}: {bench.desc}\n",
        f"T = {bench.tokens} tokens; floor {med['floor'] * 1e3:.1f} ms, {C.gf(f_floor)} GFLOP, "
        f"peak {C.mb(m_floor)} MiB; full FT {med['full'] * 1e3:.1f} ms "
        f"({med['full'] / med['floor']:.2f}× floor), {C.gf(f_full)} GFLOP, peak {C.mb(m_full)} MiB"
        + (f"; {qwix_note}" if qwix_note else "")
        + "\n",
        C.table(headers, out_rows),
    ]
    if not args.no_inference:
        lines.append("\n" + inference_line(bench, fwd_apply, args))
    return "\n".join(lines)


def inference_line(bench, fwd_apply, args, r=16):
    try:
        cfg = pj.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        q = pj.inject(bench.params, cfg, key=jax.random.key(1), layouts=bench.layouts)
        q = randomize_adapters(q, 2)
        merged = pj.merge_and_unload(q)
        c_u = C.compile_fn(fwd_apply, q, bench.batch)
        c_m = C.compile_fn(bench.fwd, merged, bench.batch)
        entries = {
            "unmerged": blocking(c_u, q, bench.batch),
            "merged": blocking(c_m, merged, bench.batch),
        }
        for fn in entries.values():
            fn()
        med, mn, n = C.round_robin(
            entries, reps=max(args.reps, 8), warmup=1, budget_s=args.budget, min_sample_s=0.05
        )
        ratio = med["unmerged"] / med["merged"]
        return (
            f"Unmerged inference (LoRA r={r}, all-linear): pj.apply {med['unmerged'] * 1e3:.2f} ms"
            f" vs merged {med['merged'] * 1e3:.2f} ms: **{ratio:.2f}×** (min {mn['unmerged'] / mn['merged']:.2f}×, "
            f"{min(n.values())} rounds; target ≤ 1.05: {'ok' if ratio <= 1.05 else 'MISS'}); "
            f"XLA GFLOP {C.gf(C.flops(c_u))} vs {C.gf(C.flops(c_m))}"
        )
    except Exception as e:  # noqa: BLE001
        if args.debug:
            traceback.print_exc()
        return f"Unmerged inference (LoRA r={r}, all-linear): error: {short_error(e)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: checks it runs")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--ranks", default="8,64", help="LoRA ranks")
    ap.add_argument("--reps", type=int, default=None, help="most timed rounds per row")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per row")
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of failing rows")
    args = ap.parse_args()
    args.explicit = any(
        a.split("=")[0] in ("--methods", "--targets", "--ranks") for a in sys.argv[1:]
    )
    args.reps = args.reps or (4 if args.quick else 12)
    args.budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.5)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    for name, got, allowed in [
        ("model", models, MODELS),
        ("method", methods, METHODS),
        ("target", targets, TARGETS),
    ]:
        bad = [g for g in got if g not in allowed]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    z = sizes(args.quick)
    t_start = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    head = [
        "# peftjax benchmark matrix" + (" (--quick)" if args.quick else ""),
        "",
        f"hidden {z['hidden']}, intermediate {z['inter']}, {z['layers']} layers, {z['heads']} heads, "
        f"vocab {z['vocab']}, batch {z['batch']} x seq {z['seq']}, float32, random init; "
        f"gradient only (no optimizer); ≤ {args.reps} round-robin rounds / ≈{args.budget:g} s per row.",
        "",
        f"Machine: {C.machine_info()}",
        "",
        "Columns: see `benchmarks/matrix.py`'s docstring. ÷ floor / ÷ full: step time ratios; "
        "÷ (floor+A): vs the floor plus the analytic adapter work A at the floor's FLOP rate; "
        "ΔGF: XLA FLOPs of the step (grad w.r.t. trainable and the input scale) minus the floor's; "
        "÷ A: ΔGF ÷ A; ok: LoRA ≤ 1.10× floor and < full FT; others ÷ (floor+A) ≤ 1.10 and (÷ A ≤ 1.25 or ΔGF < 1% of the floor's).",
    ]
    print("\n".join(head), flush=True)
    sections = ["\n".join(head)]
    full_matrix = [(t, m, r) for t in targets for m, r in method_rows(methods, ranks)]
    for name in models:
        t0 = time.perf_counter()
        rows = full_matrix
        if args.quick and not args.explicit:
            rows = QUICK_ROWS[name]
        try:
            bench = BUILDERS[name](z)
            sec = run_model(bench, rows, args, log)
        except Exception as e:  # noqa: BLE001
            if args.debug:
                traceback.print_exc()
            sec = f"\n## {name}\n\nerror: {short_error(e, 300)}"
        sec += f"\n\n({name}: {time.perf_counter() - t0:.0f}s)"
        print(sec, flush=True)
        sections.append(sec)
    tail = f"\n# total time {time.perf_counter() - t_start:.0f}s"
    print(tail)
    sections.append(tail)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
