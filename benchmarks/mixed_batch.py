"""Mixed-adapter batches (issue 12): serving K LoRA adapters in one batch.

Model: transformers' ``FlaxLlamaForCausalLM`` from `_common.llama_config` (hidden 512, inter
1376, 4 layers, vocab 1024; ``--quick``: 2 layers), random weights, float32. A batch of 64
requests x 32 tokens (``--quick``: 16 tokens), a prefill forward (logits). K = 1, 4, 16, 64
LoRA adapters (r = 8 on q/k/v/o, or every linear layer with ``--targets all-linear``, random
``B``), request ``i`` using adapter ``i % K``.
Side by side in one run, each a ``jax.jit`` function compiled before timing:

  * mixed: ``pj.apply(fwd, adapter_ids=ids)`` on a tree carrying all K adapters, the ids a
    traced int array (one compilation serves any mix);
  * loop: one call per adapter on its own requests (a one-adapter tree per adapter, so one
    compiled function serves all; what a server without mixed batches does);
  * merge per request: per adapter, ``pj.merge_and_unload`` then the merged model's forward
    on its requests;
  * base: the frozen model's forward on the whole batch (no adapter): the floor.

Reported: tokens/s (median of round-robin rounds, warm-up excluded), the ratio of each to the
mixed batch, the mixed batch's overhead over the base forward, and the compiled FLOPs of the
mixed forward vs the base's (deterministic). Run: ``python benchmarks/mixed_batch.py
[--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import ATTN, compile_fn, flops, llama_config, machine_info, round_robin, table  # noqa: E402

import peftjax as pj  # noqa: E402


def _with_random_b(p, seed):
    rng = np.random.default_rng(seed)

    def fix(x):
        if not isinstance(x, pj.Adapted):
            return x
        arrays = {
            n: {
                k: (jnp.asarray(rng.normal(0, 0.02, v.shape), v.dtype) if k == "lora_B" else v)
                for k, v in a.items()
            }
            for n, a in x.arrays.items()
        }
        return x.replace(arrays=arrays)

    return jax.tree_util.tree_map(fix, p, is_leaf=lambda x: isinstance(x, pj.Adapted))


def measure(
    layers=4,
    seq=32,
    batch=64,
    ks=(1, 4, 16, 64),
    rounds=7,
    targets="attention",
    hidden=512,
    inter=1376,
    heads=8,
    vocab=1024,
    log=print,
):
    """One dict per K: tokens/s of mixed / loop / merge / base, their median times and the
    compiled FLOPs of the mixed and base forwards (used by ``main`` and ``run.py``)."""
    from transformers import FlaxLlamaForCausalLM

    cfg = llama_config(hidden=hidden, inter=inter, layers=layers, heads=heads, vocab=vocab)
    model = FlaxLlamaForCausalLM(cfg, seed=0, input_shape=(1, 8))
    base = model.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)))
    tgt = list(ATTN) if targets == "attention" else "all-linear"
    lora = pj.LoraConfig(r=8, lora_alpha=16, target_modules=tgt)

    def fwd(p, x):
        return model(x, params=p).logits

    apply_fwd = jax.jit(pj.apply(fwd))
    base_fwd = jax.jit(fwd)
    merge = jax.jit(pj.merge_and_unload)
    singles = [
        _with_random_b(pj.inject(base, lora, key=jax.random.key(i)), i) for i in range(max(ks))
    ]
    base_c = compile_fn(fwd, base, ids)
    out, fl_base = [], flops(base_c)
    for k in ks:
        multi = _multi(singles[:k])  # k adapters a0 .. a{k-1} in one tree
        which = np.arange(batch) % k
        mixed_ids = jnp.asarray(which, jnp.int32)
        mixed = jax.jit(lambda p, x, i: pj.apply(fwd, adapter_ids=i)(p, x))
        groups = [np.nonzero(which == j)[0] for j in range(k)]
        sub = [ids[g] for g in groups]
        mixed_c = compile_fn(mixed, multi, ids, mixed_ids)  # timed and analysed: compiled once
        fl_mixed = flops(mixed_c)

        def run_mixed(multi=multi, mixed_c=mixed_c, mixed_ids=mixed_ids):
            mixed_c(multi, ids, mixed_ids).block_until_ready()

        def run_loop(k=k, sub=sub):
            outs = [apply_fwd(singles[j], sub[j]) for j in range(k)]
            jax.block_until_ready(outs)

        def run_merge(k=k, sub=sub):
            outs = [base_fwd(merge(singles[j]), sub[j]) for j in range(k)]
            jax.block_until_ready(outs)

        def run_base():
            base_c(base, ids).block_until_ready()

        fns = {"mixed": run_mixed, "loop": run_loop, "merge": run_merge, "base": run_base}
        med, mn, _ = round_robin(fns, rounds, warmup=1)
        tok = batch * seq
        out.append(
            {
                "k": k,
                "tokens": tok,
                "med": med,
                "min": mn,
                "tok_s": {n: tok / t for n, t in med.items()},
                "flops_mixed": fl_mixed,
                "flops_base": fl_base,
            }
        )
        if log:
            log(f"K={k}: " + ", ".join(f"{n} {tok / t:.0f} tok/s" for n, t in med.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--targets", default="attention", choices=["attention", "all-linear"], help="LoRA targets"
    )
    args = ap.parse_args()
    layers, seq = (2, 16) if args.quick else (4, 32)
    batch = 64
    rounds = args.rounds or (3 if args.quick else 7)
    res = measure(layers=layers, seq=seq, batch=batch, rounds=rounds, targets=args.targets)
    rows = []
    for r in res:
        med, tok = r["med"], r["tokens"]
        rows.append(
            [
                r["k"],
                f"{tok / med['mixed']:.0f}",
                f"{tok / med['loop']:.0f}",
                f"{tok / med['merge']:.0f}",
                f"{tok / med['base']:.0f}",
                f"{med['loop'] / med['mixed']:.2f}x",
                f"{med['merge'] / med['mixed']:.2f}x",
                f"{(med['mixed'] / med['base'] - 1) * 100:+.0f}%",
                f"{(r['flops_mixed'] / r['flops_base'] - 1) * 100:+.1f}%",
            ]
        )
    base_t = res[-1]["med"]["base"]
    print()
    print(machine_info())
    print(
        f"FlaxLlama hidden 512, {layers} layers; batch {batch} x {seq} tokens; LoRA r=8 "
        f"{'q/k/v/o' if args.targets == 'attention' else 'all-linear'}; "
        f"request i uses adapter i % K; median of {rounds} rounds; base {base_t * 1e3:.1f} ms"
    )
    print(
        table(
            [
                "K adapters",
                "mixed tok/s",
                "loop tok/s",
                "merge/request tok/s",
                "base tok/s",
                "loop / mixed time",
                "merge / mixed time",
                "mixed over base (time)",
                "mixed over base (FLOPs)",
            ],
            rows,
        )
    )


def _multi(singles):
    """One tree carrying each single-adapter tree's ``default`` adapter as ``a0``, ``a1``..."""
    from peftjax.node import is_adapted

    def join(*nodes):
        first = nodes[0]
        if not is_adapted(first):
            return first
        spec = dict(first.specs)["default"]
        return first.replace(
            arrays={f"a{i}": n.arrays["default"] for i, n in enumerate(nodes)},
            specs=tuple((f"a{i}", spec) for i in range(len(nodes))),
            active=("a0",),
        )

    return jax.tree_util.tree_map(join, *singles, is_leaf=is_adapted)


if __name__ == "__main__":
    main()
