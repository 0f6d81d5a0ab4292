"""Compiled FLOPs and memory of a LoRA training step: peftjax (factored) vs building W + s·A·B
each step vs full fine-tuning, on transformers' FlaxLlamaForCausalLM (random weights).

All numbers come from XLA's deterministic ``compiled.cost_analysis()['flops']`` and
``compiled.memory_analysis()``; nothing is timed, so machine load does not matter.

Variants (loss = next-token cross entropy of the logits; ``s`` is a scalar, 1.0, that multiplies
the embedding table, so that every variant back-propagates to the model's input):

  (a) base:  grad of the loss w.r.t. ``s`` only = base forward + the input-gradient backward
             through every layer (no weight gradient). This is the floor any adapter step pays.
  (b) peftjax LoRA: grad w.r.t. ``(trainable, s)`` of ``loss(pj.apply(fwd)(pj.combine(t, f)))``,
             ``t, f = pj.partition(params)``. (b)-(a) is then exactly what the adapters add;
             compare it with the analytic ``6·T·r·(in+out)`` summed over the adapted matrices.
  (b0)       as (b) but grad w.r.t. ``t`` only (what a user writes); it can be *below* (a)
             because the gradient w.r.t. layer 0's input (through its frozen q/k/v weights)
             is dead code.
  (c) naive: grad w.r.t. ``(t, s)`` of ``loss(fwd(pj.merge_and_unload(pj.combine(t, f))))``:
             ``W + s·A·B`` built every step, so XLA needs the full-size ``dW'``.
  (d) full fine-tuning: grad w.r.t. all params (embedding included).

Memory: ``memory_analysis()`` argument + output + temp − alias bytes ("peak" estimate) for the
gradient alone and for a full ``optax.adam`` step (trainable tree and optimizer state donated).

Run: ``python benchmarks/flops_memory.py`` (4 layers, batch 4 x seq 256, r = 8 and 16) or
``--quick`` (2 layers, batch 1 x seq 256, r = 8: the configuration of DESIGN.md §1).
"""

from __future__ import annotations

import argparse
import time

import _common as C
import jax
import jax.numpy as jnp
import optax

import peftjax as pj


def _scale_embed(params, s):
    """``params`` with the embedding table multiplied by ``s`` (a plain leaf in every variant)."""
    e = params["model"]["embed_tokens"]
    return {
        **params,
        "model": {**params["model"], "embed_tokens": {**e, "embedding": e["embedding"] * s}},
    }


def analytic_adapter(trainable, tokens):
    """``(factored, naive)`` analytic extra FLOPs summed over the adapted matrices."""
    fac = naive = 0
    leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
    shapes = {}
    for path, x in leaves:
        mod = tuple(str(p) for p in path[:-1])
        shapes.setdefault(mod, {})[getattr(path[-1], "key", "")] = x.shape
    for d in shapes.values():
        (din, r), (_, dout) = d["lora_A"], d["lora_B"]
        fac += 6 * tokens * r * (din + dout)
        # build dW = A@B (2·in·out·r), full dW' = x^T dy (2·T·in·out), dA, dB from it (4·in·out·r)
        naive += 2 * tokens * din * dout + 6 * din * dout * r
    return fac, naive, len(shapes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, batch 1, r=8 only")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    args = ap.parse_args()
    layers = args.layers or (2 if args.quick else 4)
    batch = args.batch or (1 if args.quick else 4)
    ranks = args.ranks or ([8] if args.quick else [8, 16])
    seq = args.seq
    T = batch * seq
    t_start = time.perf_counter()

    cfg = C.llama_config(layers=layers)
    params, fwd = C.flax_llama(cfg)
    ids = C.random_ids(batch, seq, cfg.vocab_size)
    n_params = C.tree_size(params)
    fwd_apply = pj.apply(fwd)
    one = jnp.float32(1.0)
    print(
        f"# flops_memory: FlaxLlama hidden {cfg.hidden_size}, inter {cfg.intermediate_size}, "
        f"{layers} layers, {cfg.num_attention_heads} heads, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.2f}M params; T = {batch}x{seq} = {T} tokens; LoRA on q/k/v/o, "
        f"alpha = 2r, float32"
    )
    print(f"# {C.machine_info()}\n")

    # (a) base forward + input gradient
    def loss_a(s, p, ids):
        return C.lm_loss(fwd(_scale_embed(p, s), ids), ids)

    c_a = C.compile_fn(jax.grad(loss_a), one, params, ids)
    f_a = C.flops(c_a)

    # (d) full fine-tuning
    def loss_d(p, ids):
        return C.lm_loss(fwd(p, ids), ids)

    c_d = C.compile_fn(jax.grad(loss_d), params, ids)
    f_d = C.flops(c_d)
    adam = optax.adam(1e-4)

    def step_d(p, opt_state, ids):
        loss, g = jax.value_and_grad(loss_d)(p, ids)
        upd, opt_state = adam.update(g, opt_state, p)
        return optax.apply_updates(p, upd), opt_state, loss

    mem_d = C.memory(c_d)
    mem_d_adam = C.memory(C.compile_fn(step_d, params, adam.init(params), ids, donate=(0, 1)))

    flop_rows, mem_rows = [], []
    m_a = C.memory(c_a)
    mem_rows.append(
        [
            "(a) base fwd + input-grad (no optimizer)",
            C.mb(m_a["args"]),
            C.mb(m_a["out"]),
            C.mb(m_a["temp"]),
            C.mb(m_a["peak"]),
            "-",
            "-",
        ]
    )
    flop_rows.append(["(a) base fwd + input-grad", "-", C.gf(f_a), "-", "-", "-"])
    for r in ranks:
        q = pj.inject(params, C.lora_config(r), key=jax.random.key(1))
        t, f = pj.partition(q)
        fac, naive, n_mod = analytic_adapter(t, T)

        def loss_b(t, s, f, ids):
            return C.lm_loss(fwd_apply(pj.combine(t, _scale_embed(f, s)), ids), ids)

        def loss_c(t, s, f, ids):
            merged = pj.merge_and_unload(pj.combine(t, _scale_embed(f, s)))
            return C.lm_loss(fwd(merged, ids), ids)

        c_b = C.compile_fn(jax.grad(loss_b, argnums=(0, 1)), t, one, f, ids)
        c_b0 = C.compile_fn(jax.grad(loss_b), t, one, f, ids)
        c_c = C.compile_fn(jax.grad(loss_c, argnums=(0, 1)), t, one, f, ids)
        c_c0 = C.compile_fn(jax.grad(loss_c), t, one, f, ids)
        f_b, f_b0, f_c, f_c0 = map(C.flops, (c_b, c_b0, c_c, c_c0))

        def make_step(loss):
            def step(tr, opt_state, fr, x):
                l, g = jax.value_and_grad(lambda tt: loss(tt, one, fr, x))(tr)
                upd, opt_state = adam.update(g, opt_state, tr)
                return optax.apply_updates(tr, upd), opt_state, l

            return step

        opt0 = adam.init(t)
        m_b, m_c = C.memory(c_b0), C.memory(c_c0)
        m_b_adam = C.memory(C.compile_fn(make_step(loss_b), t, opt0, f, ids, donate=(0, 1)))
        m_c_adam = C.memory(C.compile_fn(make_step(loss_c), t, opt0, f, ids, donate=(0, 1)))

        tag = f"r={r}"
        flop_rows += [
            [
                f"(b) peftjax LoRA, {tag}",
                r,
                C.gf(f_b),
                C.gf(f_b - f_a),
                C.gf(fac),
                f"{(f_b - f_a) / fac:.2f}",
            ],
            [
                f"(b0) peftjax LoRA, grad w.r.t. t only, {tag}",
                r,
                C.gf(f_b0),
                C.gf(f_b0 - f_a),
                C.gf(fac),
                "- (note 1)",
            ],
            [
                f"(c) naive W + s·A·B, {tag}",
                r,
                C.gf(f_c),
                C.gf(f_c - f_a),
                C.gf(naive),
                f"{(f_c - f_a) / naive:.2f}",
            ],
            [
                f"(c0) naive, grad w.r.t. t only, {tag}",
                r,
                C.gf(f_c0),
                C.gf(f_c0 - f_a),
                C.gf(naive),
                "- (note 1)",
            ],
        ]
        for name, m, ma in [
            ("(b) peftjax LoRA", m_b, m_b_adam),
            ("(c) naive W + s·A·B", m_c, m_c_adam),
        ]:
            mem_rows.append(
                [
                    f"{name}, {tag}",
                    C.mb(m["args"]),
                    C.mb(m["out"]),
                    C.mb(m["temp"]),
                    C.mb(m["peak"]),
                    C.mb(ma["temp"]),
                    C.mb(ma["peak"]),
                ]
            )
        print(
            f"# r={r}: {n_mod} adapted matrices, {C.tree_size(t):,} trainable params "
            f"({time.perf_counter() - t_start:.0f}s elapsed)"
        )
    n_kernel = sum(
        x.size
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if getattr(p[-1], "key", "") == "kernel"
    )
    full = 2 * T * n_kernel
    flop_rows.append(
        [
            "(d) full fine-tuning",
            "-",
            C.gf(f_d),
            C.gf(f_d - f_a),
            C.gf(full),
            f"{(f_d - f_a) / full:.2f}",
        ]
    )
    mem_rows.append(
        [
            "(d) full fine-tuning",
            C.mb(mem_d["args"]),
            C.mb(mem_d["out"]),
            C.mb(mem_d["temp"]),
            C.mb(mem_d["peak"]),
            C.mb(mem_d_adam["temp"]),
            C.mb(mem_d_adam["peak"]),
        ]
    )

    print("\n## Compiled FLOPs (XLA cost analysis, GFLOP per step)\n")
    print(
        C.table(
            ["variant", "r", "GFLOP", "minus (a)", "analytic extra", "measured / analytic"],
            flop_rows,
        )
    )
    print(
        "\nanalytic extra: (b) 6·T·r·(in+out) per adapted matrix; (c) 2·T·in·out + 6·in·out·r "
        "per adapted matrix (full dW' plus building and differentiating A·B); "
        "(d) 2·T·(weights used in matmuls), the weight gradients.\n"
        "note 1: with grad w.r.t. t only, the gradient w.r.t. layer 0's input is dead code "
        "(x·W_qᵀ, x·W_kᵀ, x·W_vᵀ of layer 0 = 3·2·T·d² FLOPs, its input norm, the embedding), "
        "so (b0)/(c0) skip work that (a) does; (b)/(c) also differentiate w.r.t. s and are the "
        "like-for-like rows."
    )
    print("\n## Compiled memory (XLA memory_analysis, MiB)\n")
    print(
        C.table(
            [
                "variant",
                "args",
                "outputs",
                "temp",
                "peak (grad only)",
                "temp (adam step)",
                "peak (adam step)",
            ],
            mem_rows,
        )
    )
    print(
        "\npeak = args + outputs + temp − aliased (donated trainable + optimizer state in the "
        "adam step). args include the frozen base weights "
        f"({C.mb(C.tree_bytes(params))} MiB)."
    )
    print(f"\n# total time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
