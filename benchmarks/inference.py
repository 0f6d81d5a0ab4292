"""Adapted inference cost: unmerged (``pj.apply``, factored LoRA) and merged
(``pj.merge_and_unload``) vs the base model, on transformers' FlaxLlamaForCausalLM.

For each shape: the jit'd forward (logits) of
  * base:     ``fwd(params, ids)``
  * unmerged: ``pj.apply(fwd)(adapted, ids)``, LoRA r=16 (alpha 32) on q/k/v/o, random ``B``
  * merged:   ``fwd(pj.merge_and_unload(adapted), ids)``
Reported: XLA ``cost_analysis()`` FLOPs ratios (deterministic) and the median latency of
round-robin calls (ratios measured side by side). Targets: unmerged ÷ base ≤ 1.10, merged ÷
base = 1.00. The analytic factored extra is ``2·T·r·(in+out)`` per adapted matrix.

Run: ``python benchmarks/inference.py`` (4 layers; batch 4 x seq 256 and batch 1 x seq 32) or
``--quick`` (2 layers; batch 1 x seq 128).
"""

from __future__ import annotations

import argparse
import time

import _common as C
import jax
import jax.numpy as jnp

import peftjax as pj


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per shape")
    args = ap.parse_args()
    layers = args.layers or (2 if args.quick else 4)
    shapes = [(1, 128)] if args.quick else [(4, 256), (1, 32)]
    reps = args.reps or (40 if args.quick else 60)
    budget = args.budget or (30.0 if args.quick else 90.0)
    r = args.rank
    t_start = time.perf_counter()

    cfg = C.llama_config(layers=layers)
    params, fwd = C.flax_llama(cfg)
    q = pj.inject(params, C.lora_config(r), key=jax.random.key(1))
    q = C.randomize_lora_b(q, jax.random.key(2))
    merged = pj.merge_and_unload(q)
    t, _ = pj.partition(q)
    n_mod = sum(
        1
        for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]
        if getattr(p[-1], "key", "") == "lora_A"
    )
    d = cfg.hidden_size
    print(
        f"# inference: FlaxLlama hidden {d}, inter {cfg.intermediate_size}, {layers} layers, "
        f"vocab {cfg.vocab_size}; LoRA r={r} alpha={2 * r} on q/k/v/o ({n_mod} matrices), "
        "random B; float32"
    )
    print(f"# {C.machine_info()}")

    f_base = jax.jit(fwd)
    f_unm = jax.jit(pj.apply(fwd))
    flop_rows, lat_rows = [], []
    for b, s in shapes:
        ids = C.random_ids(b, s, cfg.vocab_size)
        T = b * s
        fl_base = C.flops(f_base.lower(params, ids).compile())
        fl_unm = C.flops(f_unm.lower(q, ids).compile())
        fl_mrg = C.flops(f_base.lower(merged, ids).compile())
        extra = n_mod * 2 * T * r * (d + d)
        y_u, y_m = f_unm(q, ids), f_base(merged, ids)
        diff = float(jnp.max(jnp.abs(y_u - y_m)))
        moved = float(jnp.max(jnp.abs(y_u - f_base(params, ids))))
        fns = {
            "base": lambda x=ids: jax.block_until_ready(f_base(params, x)),
            "unmerged": lambda x=ids: jax.block_until_ready(f_unm(q, x)),
            "merged": lambda x=ids: jax.block_until_ready(f_base(merged, x)),
        }
        med, mn, n = C.round_robin(fns, reps=reps, warmup=2, budget_s=budget, min_sample_s=0.2)
        shp = f"{b}x{s}"
        flop_rows.append(
            [
                shp,
                C.gf(fl_base),
                C.gf(fl_unm),
                C.gf(fl_mrg),
                f"{fl_unm / fl_base:.4f}",
                f"{1 + extra / fl_base:.4f}",
                f"{fl_mrg / fl_base:.4f}",
                f"{diff:.1e} (moved {moved:.2f})",
            ]
        )
        lat_rows.append(
            [
                shp,
                f"{med['base'] * 1e3:.1f}",
                f"{med['unmerged'] * 1e3:.1f}",
                f"{med['merged'] * 1e3:.1f}",
                f"{med['unmerged'] / med['base']:.3f}",
                f"{med['merged'] / med['base']:.3f}",
                f"{mn['unmerged'] / mn['base']:.3f}",
                f"{mn['merged'] / mn['base']:.3f}",
                min(n.values()),
            ]
        )
        print(f"# {shp} done ({time.perf_counter() - t_start:.0f}s elapsed)")

    print("\n## Compiled forward FLOPs (XLA cost analysis, GFLOP)\n")
    print(
        C.table(
            [
                "batch x seq",
                "base",
                "unmerged",
                "merged",
                "unmerged ÷ base",
                "analytic (1 + extra ÷ base)",
                "merged ÷ base",
                "max abs(unmerged − merged) logits",
            ],
            flop_rows,
        )
    )
    print("\n## Forward latency (median ms, round-robin)\n")
    print(
        C.table(
            [
                "batch x seq",
                "base",
                "unmerged",
                "merged",
                "unmerged ÷ base (≤ 1.10)",
                "merged ÷ base (1.00)",
                "unmerged ÷ base (min)",
                "merged ÷ base (min)",
                "rounds",
            ],
            lat_rows,
        )
    )
    print(f"\n# total time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
