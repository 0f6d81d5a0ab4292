"""Minimal XLA:CPU reproduction: the gradient of a factored low-rank term on 3-D activations.

No peftjax here, only ``jax``: a two-layer MLP ``(B, T, D) -> H -> D`` with a factored LoRA term
``(x @ A) @ B * s`` on both layers, differentiated w.r.t. the small factors only. Written on
the 3-D activations (``x @ A`` with ``x (B, T, D)``, as every Flax layer and every peer's LoRA
writes it), XLA:CPU lowers the factor gradients ``dA = x^T @ g`` (contracting *both* the batch
and the sequence axes) by first copying the activations into a transposed ``(D, B*T)`` layout:
a full-size transposed copy of every adapted layer's input (and of its output gradient) per
step, plus a slow fallback dot. Flattening the leading axes first (``x.reshape(-1, D)``, a
free bitcast) gives plain 2-D dots whose layouts need no copy.

Printed: median step time of the input-gradient floor and of each formulation (round-robin,
side by side), XLA FLOPs, and the ``copy``/``transpose`` ops of the compiled HLO whose size is
that of an activation. The flattened form is what ``pj.apply`` uses (``forward._dot``).

Run: ``python benchmarks/xla_skinny_dots.py [--batch 8 --seq 128 --dim 256 --hidden 1024 --rank 8]``
"""

from __future__ import annotations

import argparse
import re

import _common as C
import jax
import jax.numpy as jnp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    B, T, D, H, r = a.batch, a.seq, a.dim, a.hidden, a.rank
    k = jax.random.split(jax.random.key(0), 8)
    w1 = jax.random.normal(k[0], (D, H)) * 0.02
    w2 = jax.random.normal(k[1], (H, D)) * 0.02
    x = jax.random.normal(k[2], (B, T, D))
    y = jax.random.normal(k[3], (B, T, D))
    ad = {
        "a1": jax.random.normal(k[4], (D, r)) * 0.02,
        "b1": jax.random.normal(k[5], (r, H)) * 0.02,
        "a2": jax.random.normal(k[6], (H, r)) * 0.02,
        "b2": jax.random.normal(k[7], (r, D)) * 0.02,
    }

    def lora(x, w, fa, fb, flat):
        base = x @ w
        if not flat:
            return base + (x @ fa) @ fb * 2.0
        x2 = x.reshape(-1, x.shape[-1])
        return base + (((x2 @ fa) * 2.0) @ fb).reshape(base.shape)

    def loss(ad, x, flat):
        h = jax.nn.gelu(lora(x, w1, ad["a1"], ad["b1"], flat))
        return jnp.mean((lora(h, w2, ad["a2"], ad["b2"], flat) - y) ** 2)

    def floor(s, x):
        return jnp.mean((jax.nn.gelu((x * s) @ w1) @ w2 - y) ** 2)

    steps = {
        "floor (forward + input gradient)": (jax.grad(floor), (jnp.float32(1.0), x)),
        "3-D: (x @ A) @ B": (jax.grad(lambda p, x: loss(p, x, False)), (ad, x)),
        "flattened: (x2 @ A) @ B": (jax.grad(lambda p, x: loss(p, x, True)), (ad, x)),
    }
    compiled = {n: C.compile_fn(f, *args) for n, (f, args) in steps.items()}
    calls = {
        n: (lambda c=c, args=args: jax.block_until_ready(c(*args)))
        for (n, (_, args)), c in zip(steps.items(), compiled.values())
    }
    med, mn, _ = C.round_robin(calls, reps=a.reps, budget_s=60)
    act = {B * T * D, B * T * H}
    rows = []
    floor_t = med["floor (forward + input gradient)"]
    for n, c in compiled.items():
        big = 0
        for line in c.as_text().splitlines():
            m = re.search(r"= f32\[([\d,]+)\]\{[^}]*\} (copy|transpose)\(", line)
            if m:
                size = 1
                for d in m.group(1).split(","):
                    size *= int(d)
                big += size in act
        rows.append((n, f"{med[n] * 1e3:.1f}", f"{med[n] / floor_t:.2f}", C.gf(C.flops(c)), big))
    print(C.machine_info())
    print(f"B={B} T={T} D={D} H={H} r={r}, float32\n")
    print(C.table(["step", "median ms", "÷ floor", "GFLOP", "activation-size copies"], rows))


if __name__ == "__main__":
    main()
