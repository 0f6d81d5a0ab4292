"""Sharded fine-tuning: per-device compiled memory and step time of the base model's full
fine-tune vs a LoRA step on 1, 2, 4, 8 (simulated) devices, and a scanned-layer model's
per-device memory with LoRA vs without.

Everything runs in one process on ``--xla_force_host_platform_device_count=8`` CPU devices
(set here before jax is imported); an ``n``-device run uses the first ``n``. The mesh is 2-D,
``("fsdp", "tensor")`` with shape 1x1, 2x1, 2x2, 2x4 for n = 1, 2, 4, 8, Auto axis types
(``jax.sharding.Mesh``); the batch is split over ``fsdp``, the weights Megatron / FSDP style:

  * q/k/v/gate/up kernels ``(d, out)``: ``P("fsdp", "tensor")``; o/down ``(in, d)``:
    ``P("tensor", "fsdp")``; lm_head ``(d, V)``: ``P("fsdp", "tensor")``; the embedding
    ``(V, d)``: ``P(None, ("fsdp", "tensor"))``; norm scales replicated. Per-device base weights
    shrink as 1/n (the norm scales aside).

Model: a Llama-style linen model written here (RMSNorm, causal attention, SwiGLU MLP, untied
LM head), float32, next-token cross entropy. The looped model names its blocks ``layers_i``;
the scanned one is the same block under ``nn.scan`` (kernels stacked ``(L, in, out)``, the layer
axis replicated, ``P(None, ...)`` otherwise as above; ``pj.Layout("dense", stack=1)``).

Part 1 (looped model), per n, side by side in one run:
  (a) base full fine-tune: ``value_and_grad`` w.r.t. all params + ``optax.adam``, params and
      optimizer state donated;
  (b) LoRA r=16 (alpha 32) on ``"all-linear"`` (q/k/v/o/gate/up/down; PEFT leaves the LM head
      out): ``pj.inject`` on the sharded params, ``pj.partition``, grad w.r.t. the trainable
      part only, adam on the adapter only (adapter and its optimizer state donated).
  Both ``jax.jit(..., in_shardings=..., out_shardings=...)``; (b)'s come from
  ``pj.shardings`` (then ``pj.partition`` of that tree). Per device: ``memory_analysis()``
  argument / output / temp bytes and peak = args + outputs + temp - aliased; median step time
  of round-robin rounds (warm-up excluded); the collectives in ``compiled.as_text()``
  (all-gather count and bytes per device): the LoRA step must not all-gather a base weight
  the base step does not.

Part 2 (scanned model), per n, memory only:
  (f) frozen base, no adapter: grad w.r.t. a scalar ``s`` that multiplies the embedding output
      = forward + the input-gradient backward through every layer, no weight gradient;
  (l) the same model with LoRA r=16 on all-linear: grad w.r.t. (trainable, s);
  (c) control: (l) through ``pj.merge_and_unload`` (the merged stacked kernels built and
      differentiated every step), to show what the checks report for a stacked-base copy.
  ``Δ`` = (l) - (f) of args + temp, vs the adapter's and the stacked base kernels' per-device
  bytes; ``Δ`` at a second batch size (2) extrapolated linearly to 0 tokens, its
  token-independent part (the activations the adapter gradients need grow with the tokens, a
  copy of the stacked base would not); and the HLO check: top-level (non-fused) instructions
  whose result has the shape of a stacked base kernel (the device's shard, gathered over some of
  its mesh axes, or the full ``(L, in, out)``), (l)'s and (c)'s beyond those (f) has. The
  model's shapes are picked so that no activation has a base weight's shape.

Simulated devices share the machine's cores: step times across n are not a speedup; memory is
deterministic.

Activations are held batch-split over ``fsdp`` by ``with_sharding_constraint`` at each block's
input, residual and output (without them XLA's propagation follows the feature-sharded
embedding and keeps the whole batch on every device).

Run: ``python benchmarks/sharding.py`` (hidden 512, inter 1408, 4 layers, 8 heads, vocab 2048,
batch 6 x seq 128, 5 timed rounds) or ``--quick`` (hidden 128, 2 layers, batch 4 x seq 24,
n = 1 and 8 only, 2 timed rounds).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import (  # noqa: E402
    Mesh,
    NamedSharding,
    PartitionSpec as P,  # noqa: E402
)

import peftjax as pj  # noqa: E402

RANK = 16
MESHES = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (2, 4)}
COL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # (d, out): P(fsdp, tensor)
ROW = ("o_proj", "down_proj")  # (in, d): P(tensor, fsdp)


# ------------------------------------------------------------------------------------ model


class RMS(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def constrain(x, act):
    """``x`` (batch, seq, d) held batch-split over ``fsdp`` (FSDP style), when ``act`` is given."""
    return x if act is None else jax.lax.with_sharding_constraint(x, act)


class Block(nn.Module):
    d: int
    h: int
    heads: int
    act: Any = None  # NamedSharding of the (batch, seq, d) activations

    @nn.compact
    def __call__(self, x, _=None):
        x = constrain(x, self.act)
        b, t, d = x.shape
        nh, hd = self.heads, d // self.heads
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
        a = RMS(name="input_norm")(x)
        q = dense(d, "q_proj")(a).reshape(b, t, nh, hd)
        k = dense(d, "k_proj")(a).reshape(b, t, nh, hd)
        v = dense(d, "v_proj")(a).reshape(b, t, nh, hd)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
        x = constrain(x + dense(d, "o_proj")(o), self.act)
        m = RMS(name="post_norm")(x)
        g, u = dense(self.h, "gate_proj")(m), dense(self.h, "up_proj")(m)
        return constrain(x + dense(d, "down_proj")(jax.nn.silu(g) * u), self.act), None


class LM(nn.Module):
    d: int
    h: int
    heads: int
    layers: int
    vocab: int
    scan: bool = False
    act: Any = None

    @nn.compact
    def __call__(self, ids, s=1.0):
        x = constrain(nn.Embed(self.vocab, self.d, name="embed")(ids) * s, self.act)
        if self.scan:
            Stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
            )
            x, _ = Stack(self.d, self.h, self.heads, self.act, name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.d, self.h, self.heads, self.act, name=f"layers_{i}")(x)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(RMS(name="norm")(x))


def spec_of(names: tuple[str, ...], ndim: int) -> P:
    """The base weight's PartitionSpec from its module name (stacked: layer axis replicated)."""
    mod, leaf = names[-2], names[-1]
    if leaf == "embedding":
        e = [None, ("fsdp", "tensor")]
    elif leaf == "scale":
        e = [None]
    elif mod in COL or mod == "lm_head":
        e = ["fsdp", "tensor"]
    elif mod in ROW:
        e = ["tensor", "fsdp"]
    else:
        raise ValueError(f"no sharding rule for {names}")
    return P(*([None] * (ndim - len(e)) + e))


def base_shardings(params, mesh):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, spec_of(tuple(str(k.key) for k in kp), x.ndim)),
        params,
    )


def make_mesh(n):
    return Mesh(np.array(jax.devices()[:n]).reshape(MESHES[n]), ("fsdp", "tensor"))


def opt_shardings(opt, state, tree_sh, mesh):
    rep = NamedSharding(mesh, P())
    return optax.tree_map_params(
        opt, lambda _, s: s, state, tree_sh, transform_non_params=lambda _: rep
    )


def weight_shapes(params, mesh, leaves=("kernel", "embedding"), per_layer=False) -> set:
    """Every shape a base weight takes on ``mesh``: its shard, and it gathered over any subset
    of the mesh axes its spec splits it on (what an all-gather or a copy of it would have);
    with ``per_layer``, also one layer's slice of each stacked kernel."""
    import itertools

    out = set()
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(str(k.key) for k in kp)
        if names[-1] not in leaves:
            continue
        spec = spec_of(names, x.ndim)
        options = []
        for n, e in zip(x.shape, spec, strict=True):
            axes = () if e is None else (e,) if isinstance(e, str) else tuple(e)
            divs = {
                math.prod(mesh.shape[a] for a in sub)
                for k in range(len(axes) + 1)
                for sub in itertools.combinations(axes, k)
            }
            options.append(sorted({n // dv for dv in divs}))
        out |= set(itertools.product(*options))
        if per_layer and names[0] == "layers" and x.ndim == 3:
            out |= set(itertools.product(*options[1:]))
    return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the (sharded) arrays / ShapeDtypeStructs in ``tree``."""
    tot = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        tot += math.prod(shape) * x.dtype.itemsize
    return tot


# ------------------------------------------------------------------------------------ HLO

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_ITEM = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def _shapes(type_str):
    return [
        (dt, tuple(int(v) for v in dims.split(",") if v)) for dt, dims in _SHAPE.findall(type_str)
    ]


def hlo_instructions(text):
    """``[(computation, opcode, [(dtype, shape)], name)]`` of every HLO instruction."""
    out, comp = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("{") and "=" not in s.split("(")[0]:
            comp = s.split()[1] if s.startswith("ENTRY") else s.split()[0]
            continue
        m = _INSTR.match(line)
        if m:
            out.append((comp.lstrip("%"), m.group(3), _shapes(m.group(2)), m.group(1)))
    return out


def collectives(text):
    """``{op: (count, bytes)}`` of the collectives; all-gather result shapes as a Counter."""
    res, gathered = {}, Counter()
    for _comp, op, shapes, _ in hlo_instructions(text):
        base = op.removesuffix("-start")
        if base not in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"):
            continue
        if op.endswith("-done"):
            continue
        sh = shapes[-1:] if op.endswith("-start") else shapes
        b = sum(math.prod(s) * _ITEM.get(dt, 4) for dt, s in sh)
        c, tb = res.get(base, (0, 0))
        res[base] = (c + 1, tb + b)
        if base == "all-gather":
            for dt, s in sh:
                gathered[(dt, s)] += 1
    return res, gathered


# ops that alias buffers made elsewhere (a while's tuple is its init's / its body's outputs)
_ALIAS_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call"}


def stacked_like(text, shapes):
    """Top-level (non-fused) instructions whose result has one of ``shapes``, by (op, shape)."""
    c = Counter()
    for comp, op, res, _ in hlo_instructions(text):
        if comp.startswith(("fused", "wrapped")):  # inside a fusion: no buffer of its own
            continue
        if op in _ALIAS_OPS:
            continue
        for _, s in res:
            if s in shapes:
                c[(op, s)] += 1
    return c


# ------------------------------------------------------------------------------------ parts


def fmt_coll(res):
    parts = []
    for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all"):
        if op in res:
            n, b = res[op]
            parts.append(f"{op} {n}x {C.mb(b)}")
    return ", ".join(parts) or "none"


def steps(model, adam):
    """``(base_step, lora_step)`` of ``model``: full fine-tune and LoRA adam steps."""

    def loss(p, ids):
        return C.lm_loss(model.apply({"params": p}, ids), ids)

    lossf = pj.apply(loss)

    def base_step(p, o, ids):
        l, g = jax.value_and_grad(loss)(p, ids)
        u, o = adam.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    def lora_step(t, o, f, ids):
        l, g = jax.value_and_grad(lambda tt: lossf(pj.combine(tt, f), ids))(t)
        u, o = adam.update(g, o, t)
        return optax.apply_updates(t, u), o, l

    return base_step, lora_step


def time_pair(c_a, c_b, state_a, state_b, frozen, ids, reps, budget):
    """Round-robin medians / minima of the donated steps (a) and (b), each fed its outputs."""
    st = {"a": state_a, "b": state_b}

    def run_a():
        p, o, l = c_a(*st["a"], ids)
        st["a"] = (p, o)
        l.block_until_ready()

    def run_b():
        t, o, l = c_b(*st["b"], frozen, ids)
        st["b"] = (t, o)
        l.block_until_ready()

    return C.round_robin({"a": run_a, "b": run_b}, reps, warmup=1, budget_s=budget)


def part1(z, ns, reps, budget, report):
    d, h, L, V, H = z["hidden"], z["inter"], z["layers"], z["vocab"], z["heads"]
    model = LM(d, h, H, L, V)
    ids0 = C.random_ids(z["batch"], z["seq"], V)
    params0 = jax.tree.map(np.asarray, model.init(jax.random.key(0), ids0)["params"])
    n_par = C.tree_size(params0)
    cfg = pj.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    adam = optax.adam(1e-4)

    print(
        f"\n## Part 1: looped Llama-style model, hidden {d}, inter {h}, {L} layers, {H} heads, "
        f"vocab {V}, {n_par / 1e6:.2f}M params ({C.mb(C.tree_bytes(params0))} MiB f32), "
        f"batch {z['batch']} x seq {z['seq']}; LoRA r={RANK} on all-linear; adam\n"
    )
    mem_rows, time_rows, coll_rows, spec_rows = [], [], [], []
    problems = []
    for n in ns:
        t0 = time.perf_counter()
        mesh, rep, p_sh, ids_sh, act = on_mesh(n, params0)
        base_step, lora_step = steps(LM(d, h, H, L, V, act=act), adam)
        params = jax.device_put(params0, p_sh)  # from host: (a) donates it, (b) has its own
        ids = jax.device_put(ids0, ids_sh)
        base_dev = per_device_bytes(params)
        # (a) full fine-tune
        o_a = adam.init(params)
        o_sh = opt_shardings(adam, o_a, p_sh, mesh)
        o_a = jax.device_put(o_a, o_sh)
        c_a = (
            jax.jit(
                base_step,
                in_shardings=(p_sh, o_sh, ids_sh),
                out_shardings=(p_sh, o_sh, rep),
                donate_argnums=(0, 1),
            )
            .lower(params, o_a, ids)
            .compile()
        )
        # (b) LoRA
        q = pj.inject(jax.device_put(params0, p_sh), cfg, key=jax.random.key(1))
        q_sh = pj.shardings(q, p_sh)
        # the adapters inject placed must sit where pj.shardings says
        bad = [
            jax.tree_util.keystr(kp)
            for (kp, x), s in zip(
                jax.tree_util.tree_flatten_with_path(q)[0],
                jax.tree_util.tree_leaves(q_sh),
                strict=True,
            )
            if not x.sharding.is_equivalent_to(s, x.ndim)
        ]
        if bad:
            problems.append(f"n={n}: inject placed {len(bad)} arrays off pj.shardings: {bad[:3]}")
        t, f = pj.partition(q)
        t_sh, f_sh = pj.partition(q_sh)
        o_b = adam.init(t)
        ot_sh = opt_shardings(adam, o_b, t_sh, mesh)
        o_b = jax.device_put(o_b, ot_sh)
        c_b = (
            jax.jit(
                lora_step,
                in_shardings=(t_sh, ot_sh, f_sh, ids_sh),
                out_shardings=(t_sh, ot_sh, rep),
                donate_argnums=(0, 1),
            )
            .lower(t, o_b, f, ids)
            .compile()
        )
        if n == ns[-1]:
            for mod in ("q_proj", "o_proj", "gate_proj", "down_proj"):
                node = q_sh["layers_0"][mod]["kernel"]
                ar = node.arrays["default"]
                spec_rows.append(
                    [
                        f"layers_0.{mod}",
                        str(node.base.spec),
                        str(ar["lora_A"].spec),
                        str(ar["lora_B"].spec),
                    ]
                )
        m_a, m_b = C.memory(c_a), C.memory(c_b)
        adapter = per_device_bytes(t)
        hlo_a, hlo_b = c_a.as_text(), c_b.as_text()
        col_a, ag_a = collectives(hlo_a)
        col_b, ag_b = collectives(hlo_b)
        # all-gathers of base-weight-sized arrays in (b) beyond (a)'s
        w_a, w_b, extra = weight_gathers(ag_a, ag_b, weight_shapes(params0, mesh))
        if extra:
            problems.append(
                f"n={n}: LoRA step all-gathers beyond the base step's: "
                + ", ".join(f"{dt}{list(s)} x{c}" for (dt, s), c in extra.items())
            )
        med, mn, rounds = time_pair(c_a, c_b, (params, o_a), (t, o_b), f, ids, reps, budget)
        mshape = "x".join(map(str, MESHES[n]))
        for tag, m in (("(a) base full FT", m_a), ("(b) LoRA", m_b)):
            mem_rows.append(
                [
                    n,
                    mshape,
                    tag,
                    C.mb(m["args"]),
                    C.mb(m["out"]),
                    C.mb(m["temp"]),
                    C.mb(m["alias"]),
                    C.mb(m["peak"]),
                ]
            )
        mem_rows.append(
            [
                n,
                mshape,
                "LoRA / base",
                f"{m_b['args'] / m_a['args']:.3f}",
                f"{m_b['out'] / m_a['out']:.3f}",
                f"{m_b['temp'] / m_a['temp']:.3f}",
                "-",
                f"{m_b['peak'] / m_a['peak']:.3f}",
            ]
        )
        time_rows.append(
            [
                n,
                mshape,
                f"{med['a'] * 1e3:.0f}",
                f"{med['b'] * 1e3:.0f}",
                f"{med['b'] / med['a']:.2f}",
                f"{mn['a'] * 1e3:.0f} / {mn['b'] * 1e3:.0f}",
                rounds["a"],
            ]
        )
        wsum = lambda w: (
            f"{sum(w.values())}x {C.mb(sum(c * math.prod(s) * 4 for (_, s), c in w.items()))}"
        )
        coll_rows.append(
            [
                n,
                mshape,
                fmt_coll(col_a),
                fmt_coll(col_b),
                f"{wsum(w_a)} / {wsum(w_b)}",
                ", ".join(f"{list(s)} x{c}" for (_, s), c in extra.items()) or "none",
                C.mb(adapter),
            ]
        )
        report[n] = dict(m_a=m_a, m_b=m_b, adapter=adapter, base=base_dev)
        print(
            f"# n={n}: base weights {C.mb(base_dev)} MiB/device, adapter "
            f"{C.mb(adapter)} MiB/device ({C.tree_size(t):,} params); "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        del params, o_a, q, t, f, o_b, c_a, c_b

    print("\n### Per-device compiled memory (memory_analysis, MiB)\n")
    print(
        C.table(
            ["n", "mesh fsdp x tensor", "step", "args", "outputs", "temp", "aliased", "peak"],
            mem_rows,
        )
    )
    print(
        "\npeak = args + outputs + temp - aliased (donated params + adam state in (a), donated "
        "adapter + its adam state in (b)). (a)'s args = params + 2 adam moments; (b)'s = frozen "
        "base + adapter + its 2 moments."
    )
    print("\n### Step time (median ms of round-robin rounds, warm-up excluded)\n")
    print(
        C.table(
            ["n", "mesh", "(a) base full FT", "(b) LoRA", "LoRA / base", "min a / b", "rounds"],
            time_rows,
        )
    )
    print("\nthe n simulated devices share the same CPU cores: times across n are not a speedup.")
    print("\n### Collectives per step in the compiled HLO (count, result MiB per device)\n")
    print(
        C.table(
            [
                "n",
                "mesh",
                "(a) base full FT",
                "(b) LoRA",
                "base-weight all-gathers (a) / (b)",
                "extra in (b)",
                "adapter MiB/dev",
            ],
            coll_rows,
        )
    )
    print(
        "\nbase-weight all-gathers: all-gathers whose result has the shape of a base kernel or "
        "the embedding gathered over some of its mesh axes (the model's shapes are picked so "
        "that no activation has one); the rest gather activations and adapter arrays."
    )
    print("\n### Adapter shardings from pj.shardings (layer 0, largest mesh)\n")
    print(C.table(["module", "base kernel", "lora_A (in, r)", "lora_B (r, out)"], spec_rows))
    return problems


def _scans(jaxpr, acc):
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            acc.append(e)
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                _scans(inner, acc)
    return acc


def scan_residuals(fn, *args):
    """``(count, bytes, by shape)`` of the outputs of the first (forward) scan in ``fn``'s
    jaxpr: the layer loop's carry plus the residuals it stacks for the backward."""
    fwd = _scans(jax.make_jaxpr(fn)(*args).jaxpr, [])[0]
    avals = [v.aval for v in fwd.outvars]
    by = Counter(tuple(a.shape) for a in avals)
    return len(avals), sum(math.prod(a.shape) * a.dtype.itemsize for a in avals), by


def on_mesh(n, params0):
    """``(mesh, replicated, base shardings, ids sharding, activation sharding)`` for ``n``."""
    mesh = make_mesh(n)
    return (
        mesh,
        NamedSharding(mesh, P()),
        base_shardings(params0, mesh),
        NamedSharding(mesh, P("fsdp", None)),
        NamedSharding(mesh, P("fsdp", None, None)),
    )


def weight_gathers(ag_base, ag_lora, shapes):
    """``(base's, LoRA's, LoRA's beyond base's)`` all-gather counts of base-weight shapes."""
    w_a = {k: c for k, c in ag_base.items() if k[1] in shapes}
    w_b = {k: c for k, c in ag_lora.items() if k[1] in shapes}
    return w_a, w_b, {k: c - w_a.get(k, 0) for k, c in w_b.items() if c > w_a.get(k, 0)}


#: observations worth a line that are not failures of the checks
NOTES: list[str] = []


def mb2(x) -> str:
    return f"{x / 2**20:.2f}"


def _naive_loss(loss):
    return lambda t, s, f, ids: loss(pj.merge_and_unload(pj.combine(t, f)), s, ids)


def _lora_loss(lossf):
    return lambda t, s, f, ids: lossf(pj.combine(t, f), s, ids)


def _residual_rows(model, params0, cfg, layouts, ids, L):
    def loss(p, s, ids):
        return C.lm_loss(model.apply({"params": p}, ids, s), ids)

    q = pj.inject(params0, cfg, key=jax.random.key(1), layouts=layouts)
    t, f = pj.partition(q)
    one = jnp.float32(1.0)
    tokens = ids.size
    rows = []
    for tag, fn, args in (
        ("(f) frozen base", jax.grad(loss, argnums=1), (params0, one, ids)),
        ("(l) LoRA", jax.grad(_lora_loss(pj.apply(loss)), argnums=(0, 1)), (t, one, f, ids)),
        ("(c) naive W + s·A·B", jax.grad(_naive_loss(loss), argnums=(0, 1)), (t, one, f, ids)),
    ):
        n, b, by = scan_residuals(fn, *args)
        flat = {s: c for s, c in by.items() if len(s) == 3 and s[:2] == (L, tokens)}
        fb = sum(c * math.prod(s) * 4 for s, c in flat.items())
        top = max(by.items(), key=lambda kv: math.prod(kv[0]) * kv[1])
        rows.append(
            [
                tag,
                n,
                mb2(b),
                (", ".join(f"{list(s)} x{c}" for s, c in sorted(flat.items())) or "none")
                + (f" = {mb2(fb)} MiB" if flat else ""),
                f"{list(top[0])} x{top[1]}",
            ]
        )
    return rows


def part2(z, ns, report):
    d, h, L, V, H = z["hidden"], z["inter"], z["layers"], z["vocab"], z["heads"]
    B, B2, S = z["batch"], 2, z["seq"]
    model = LM(d, h, H, L, V, scan=True)
    params0 = jax.tree.map(
        np.asarray, model.init(jax.random.key(0), C.random_ids(1, S, V))["params"]
    )
    cfg = pj.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    layouts = {r"layers\..*": pj.Layout("dense", stack=1)}
    one = jnp.float32(1.0)
    stacked = [k for k, v in params0["layers"].items() if "kernel" in v]
    print(
        f"\n## Part 2: scanned model (nn.scan over {L} layers; kernels (L, in, out), layer axis "
        f"replicated), same shapes, batch {B} x seq {S} (and {B2} x {S} for the token-independent "
        f"part); LoRA r={RANK} all-linear with layouts={{'layers\\..*': "
        "pj.Layout('dense', stack=1)}; forward + backward, no optimizer\n"
    )
    rows, delta_rows, hlo_rows, problems = [], [], [], []
    res_rows = _residual_rows(model, params0, cfg, layouts, C.random_ids(B, S, V), L)
    lora_mb, naive_mb = float(res_rows[1][2]), float(res_rows[2][2])
    if lora_mb > 1.1 * naive_mb:  # LoRA's scan keeps more for its backward than the naive step
        problems.append(
            f"scan: the LoRA forward scan stacks {lora_mb:.2f} MiB of residuals, over 1.1x the "
            f"naive W + s·A·B step's {naive_mb:.2f} MiB (one flattened input per module?)"
        )
    for n in ns:
        t0 = time.perf_counter()
        mesh, rep, p_sh, ids_sh, act = on_mesh(n, params0)
        model = LM(d, h, H, L, V, scan=True, act=act)

        def loss(p, s, ids, model=model):
            return C.lm_loss(model.apply({"params": p}, ids, s), ids)

        lossf = pj.apply(loss)
        params = jax.device_put(params0, p_sh)
        q = pj.inject(params, cfg, key=jax.random.key(1), layouts=layouts)
        q_sh = pj.shardings(q, p_sh)
        t, f = pj.partition(q)
        t_sh, f_sh = pj.partition(q_sh)
        g_f = jax.jit(
            jax.grad(loss, argnums=1), in_shardings=(p_sh, rep, ids_sh), out_shardings=rep
        )
        g_l = jax.jit(
            jax.grad(_lora_loss(lossf), argnums=(0, 1)),
            in_shardings=(t_sh, rep, f_sh, ids_sh),
            out_shardings=(t_sh, rep),
        )
        comp = {}
        for b in (B, B2):
            ids = jax.device_put(C.random_ids(b, S, V), ids_sh)
            comp[b] = (
                g_f.lower(params, one, ids).compile(),
                g_l.lower(t, one, f, ids).compile(),
            )
        c_f, c_l = comp[B]
        m_f, m_l = C.memory(c_f), C.memory(c_l)
        # control: the naive step that builds W + s·A·B (stacked) every step
        c_c = (
            jax.jit(
                jax.grad(_naive_loss(loss), argnums=(0, 1)),
                in_shardings=(t_sh, rep, f_sh, ids_sh),
                out_shardings=(t_sh, rep),
            )
            .lower(t, one, f, ids)
            .compile()
        )
        m_c = C.memory(c_c)
        adapter = per_device_bytes(t)
        stacked_dev = sum(per_device_bytes(params["layers"][k]["kernel"]) for k in stacked)
        at = lambda m: m["args"] + m["temp"]
        dl = {b: at(C.memory(cl)) - at(C.memory(cf)) for b, (cf, cl) in comp.items()}
        # delta = a + c * tokens: its token-independent part a, extrapolated to 0 tokens
        icpt = dl[B] - (dl[B] - dl[B2]) * B / (B - B2)
        # shapes a copy of a stacked base kernel would have: its shard, gathered, full
        shapes = {sh for sh in weight_shapes(params0, mesh, ("kernel",)) if len(sh) == 3}
        hlo_f, hlo_l = c_f.as_text(), c_l.as_text()
        s_f, s_l = stacked_like(hlo_f, shapes), stacked_like(hlo_l, shapes)
        s_c = stacked_like(c_c.as_text(), shapes)
        extra = {k: c - s_f.get(k, 0) for k, c in s_l.items() if c > s_f.get(k, 0)}
        extra_c = {k: c - s_f.get(k, 0) for k, c in s_c.items() if c > s_f.get(k, 0)}
        col_f, ag_f = collectives(hlo_f)
        col_l, ag_l = collectives(hlo_l)
        wsh = weight_shapes(params0, mesh, per_layer=True)
        w_f, w_l, extra_ag = weight_gathers(ag_f, ag_l, wsh)
        if extra_ag:
            problems.append(
                f"scan n={n}: LoRA step all-gathers base weights beyond the base step's: "
                + ", ".join(f"{dt}{list(s)} x{c}" for (dt, s), c in extra_ag.items())
            )
        mshape = "x".join(map(str, MESHES[n]))
        for tag, m in (
            ("(f) frozen base fwd+bwd", m_f),
            ("(l) LoRA fwd+bwd", m_l),
            ("(c) control: naive W + s·A·B", m_c),
        ):
            rows.append(
                [n, mshape, tag]
                + [mb2(m[k]) for k in ("args", "out", "temp")]
                + [mb2(at(m)), f"{m['temp'] / stacked_dev:.2f}"]
            )
        delta_rows.append(
            [
                n,
                mshape,
                mb2(stacked_dev),
                mb2(adapter),
                mb2(m_l["args"] - m_f["args"]),
                mb2(m_l["temp"] - m_f["temp"]),
                mb2(dl[B]),
                mb2(dl[B2]),
                mb2(icpt),
                f"{icpt / adapter:.2f}",
                f"{icpt / stacked_dev:.3f}",
            ]
        )
        hlo_rows.append(
            [
                n,
                mshape,
                ", ".join(f"{op} {list(s)} x{c}" for (op, s), c in sorted(s_f.items())) or "none",
                ", ".join(f"{op} {list(s)} x{c}" for (op, s), c in sorted(extra.items())) or "none",
                f"{sum(extra_c.values())} ({mb2(at(m_c) - at(m_f))} MiB Δ args+temp)",
                fmt_coll(col_f),
                fmt_coll(col_l),
                f"{sum(w_f.values())} / {sum(w_l.values())}",
            ]
        )
        if extra:
            problems.append(
                f"scan n={n}: LoRA step has stacked-kernel-shaped buffers the base lacks: {extra}"
            )
        if m_l["temp"] - m_c["temp"] > 2 * adapter:  # a note: the factored backward's buffers
            NOTES.append(
                f"scan n={n}: the factored LoRA step's temp is {mb2(m_l['temp'] - m_c['temp'])} "
                f"MiB above the naive W + s·A·B control's ({mb2(m_l['temp'])} vs "
                f"{mb2(m_c['temp'])} MiB; frozen base {mb2(m_f['temp'])}): per-token "
                "activations, see the forward-scan residuals table"
            )
        if icpt > 0.5 * stacked_dev:
            problems.append(
                f"scan n={n}: LoRA's token-independent extra memory {mb2(icpt)} MiB is over half "
                f"the stacked base ({mb2(stacked_dev)} MiB)"
            )
        report[("scan", n)] = dict(m_f=m_f, m_l=m_l, adapter=adapter, stacked=stacked_dev)
        print(f"# scan n={n}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\n### Scanned model: per-device compiled memory, batch {B} x seq {S} (MiB)\n")
    print(
        C.table(
            ["n", "mesh", "step", "args", "outputs", "temp", "args + temp", "temp ÷ stacked base"],
            rows,
        )
    )
    print(
        "\n(f)'s args = base weights + ids, outputs the scalar grad; (l)'s args = base + adapter "
        "+ ids, outputs the adapter grads + the scalar's. (c) is (l) through "
        "`pj.merge_and_unload` (the merged stacked kernels built and differentiated every step): "
        "the control for the checks below. stacked base = the stacked kernels' bytes on one "
        "device."
    )
    print("\n### Scanned model: what LoRA adds, per device (MiB)\n")
    print(
        C.table(
            [
                "n",
                "mesh",
                "stacked base",
                "adapter",
                "Δ args",
                "Δ temp",
                f"Δ (args+temp), {B}x{S}",
                f"Δ, {B2}x{S}",
                "Δ at 0 tokens",
                "Δ0 ÷ adapter",
                "Δ0 ÷ stacked base",
            ],
            delta_rows,
        )
    )
    print(
        "\nΔ = (l) − (f). Part of Δ temp is activations the adapter gradients need (each adapted "
        "module's input and x·A, per layer), which grow with the tokens; Δ at 0 tokens "
        "extrapolates Δ linearly from the two batch sizes to the token-independent part: about "
        "the adapter (its arrays; its gradients are outputs), not a stacked-base copy, which "
        "would make Δ0 ÷ stacked base ≈ 1."
    )
    print(
        f"\n### Scanned model: the forward scan's stacked outputs (jaxpr, one device, batch "
        f"{B} x seq {S}, global shapes)\n"
    )
    print(
        C.table(
            ["step", "outputs", "MiB", "of which (L, tokens, features) 2-D", "largest"], res_rows
        )
    )
    print(
        "\nthe layer loop's carry plus what it stacks for the backward pass, before XLA: "
        "(L, tokens, features) are flattened 2-D activations, one per adapted module."
    )
    print("\n### Scanned model: stacked-base-shaped buffers and collectives (per device)\n")
    print(
        C.table(
            [
                "n",
                "mesh",
                "stacked-shaped buffers in (f)",
                "extra in (l)",
                "extra in (c), control",
                "collectives (f)",
                "collectives (l)",
                "base-weight all-gathers (f) / (l)",
            ],
            hlo_rows,
        )
    )
    print(
        "\nstacked-shaped: top-level (non-fused) HLO instructions, not parameters / tuples / "
        "while loops / bitcasts, whose result has a stacked base kernel's shape (the device's "
        "shard, gathered over some of its mesh axes, or the full (L, in, out)); the model's "
        "shapes are picked so that no activation has one."
    )
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="hidden 128, 2 layers, 4x24, n = 1 and 8, 2 rounds"
    )
    ap.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=None,
        choices=[1, 2, 4, 8],
        help="device counts (default 1 2 4 8; quick 1 8)",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 2)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per n")
    ap.add_argument("--no-scan", action="store_true", help="skip part 2")
    args = ap.parse_args()
    if args.quick:
        z = dict(hidden=128, inter=352, layers=2, heads=4, vocab=512, batch=4, seq=24)
    else:
        z = dict(hidden=512, inter=1408, layers=4, heads=8, vocab=2048, batch=6, seq=128)
    reps = args.reps or (2 if args.quick else 5)
    ns = args.devices or ([1, 8] if args.quick else [1, 2, 4, 8])
    budget = args.budget or (5.0 if args.quick else 30.0)
    t_start = time.perf_counter()
    print("# sharding: per-device memory and step time, base full fine-tune vs LoRA on a mesh")
    print(f"# {C.machine_info()}; XLA_FLAGS={os.environ['XLA_FLAGS']}")
    report = {}
    problems = part1(z, ns, reps, budget, report)
    if not args.no_scan:
        problems += part2(z, ns, report)
    if len(ns) > 1:
        a0, a1 = report[ns[0]], report[ns[-1]]
        print(
            f"\nper-device args, n={ns[0]} -> n={ns[-1]}: base FT {C.mb(a0['m_a']['args'])} -> "
            f"{C.mb(a1['m_a']['args'])} MiB ({a1['m_a']['args'] / a0['m_a']['args']:.3f}x), "
            f"LoRA {C.mb(a0['m_b']['args'])} -> {C.mb(a1['m_b']['args'])} MiB "
            f"({a1['m_b']['args'] / a0['m_b']['args']:.3f}x); 1/n = {ns[0] / ns[-1]:.3f}"
        )
    print("\n## Problems found\n")
    print("\n".join(f"- {p}" for p in problems) if problems else "none")
    if NOTES:
        print("\n## Notes\n")
        print("\n".join(f"- {p}" for p in NOTES))
    print(f"\n# total time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
