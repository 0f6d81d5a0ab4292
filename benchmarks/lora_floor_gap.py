"""Is the gap between a LoRA step and its floor peftjax's, or the factored rule's on XLA:CPU?

On the matrix's linen MLP (4 residual blocks ``x + fc2(relu(fc1(x)))``, 256 -> 1024 -> 256,
batch 8 x seq 128, LoRA r=8 on every Dense) three steps are compiled side by side:

* the floor: forward + input gradient (grad w.r.t. a scale on the input);
* peftjax: ``jax.grad`` w.r.t. ``pj.partition``'s trainable part through ``pj.apply``;
* a hand-written LoRA in plain jax, already in the best form found (flattened to 2-D
  ``(tokens, features)``, scale on the rank-wide ``x @ A``), on the same weights.

If peftjax's step matches the hand-written one in XLA FLOPs, temp memory and time, what is left
above the floor is the cost of the factored rule itself on this backend (saving and re-reading
every adapted layer's input for the factor gradients; rank-8 dots run at memory speed), not
peftjax's.

Run: ``python benchmarks/lora_floor_gap.py [--rank 8 --reps 30]``
"""

from __future__ import annotations

import argparse

import _common as C
import jax
import jax.numpy as jnp
from flax import linen as nn

import peftjax as pj

B, T, D, H, BLOCKS = 8, 128, 256, 1024, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="fc2")(jax.nn.relu(nn.Dense(H, name="fc1")(x)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(BLOCKS):
            x = Block(name=f"b{i}")(x)
        return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    r, s = a.rank, 2.0
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    y = jax.random.normal(jax.random.key(1), (B, T, D))
    p = m.init(jax.random.key(2), x)
    cfg = pj.LoraConfig(r=r, lora_alpha=s * r, target_modules="all-linear")
    t, f = pj.partition(pj.inject(p, cfg, key=jax.random.key(3)))
    t = jax.tree_util.tree_map(lambda v: v + 0.01, t)  # nothing trivially zero

    def pj_loss(t):
        return jnp.mean((pj.apply(m.apply)(pj.combine(t, f), x) - y) ** 2)

    def hand(ad, x):
        for i in range(BLOCKS):
            bp, (a1, b1, a2, b2) = p["params"][f"b{i}"], ad[i]
            x2 = x.reshape(-1, D)
            h = x2 @ bp["fc1"]["kernel"] + bp["fc1"]["bias"] + ((x2 @ a1) * s) @ b1
            h = jax.nn.relu(h)
            o = h @ bp["fc2"]["kernel"] + bp["fc2"]["bias"] + ((h @ a2) * s) @ b2
            x = x + o.reshape(x.shape)
        return x

    shapes = [(D, r), (r, H), (H, r), (r, D)]
    ad = [tuple(jnp.full(sh, 0.01) for sh in shapes) for _ in range(BLOCKS)]

    def hand_loss(ad):
        return jnp.mean((hand(ad, x) - y) ** 2)

    def floor(sc):
        return jnp.mean((m.apply(p, x * sc) - y) ** 2)

    steps = {
        "floor (forward + input gradient)": (jax.grad(floor), (jnp.float32(1.0),)),
        "peftjax (pj.apply)": (jax.grad(pj_loss), (t,)),
        "hand-written flattened LoRA": (jax.grad(hand_loss), (ad,)),
    }
    comp = {k: C.compile_fn(fn, *args) for k, (fn, args) in steps.items()}
    calls = {k: (lambda k=k: jax.block_until_ready(comp[k](*steps[k][1]))) for k in comp}
    med, _, _ = C.round_robin(calls, reps=a.reps, budget_s=60)
    fl = med["floor (forward + input gradient)"]
    rows = [
        (
            k,
            f"{med[k] * 1e3:.1f}",
            f"{med[k] / fl:.2f}",
            C.gf(C.flops(c)),
            C.mb(c.memory_analysis().temp_size_in_bytes),
        )
        for k, c in comp.items()
    ]
    print(C.machine_info())
    print(f"B={B} T={T} D={D} H={H} blocks={BLOCKS} r={r}, float32\n")
    print(C.table(["step", "median ms", "÷ floor", "GFLOP", "temp MiB"], rows))


if __name__ == "__main__":
    main()
