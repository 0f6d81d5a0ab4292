"""QLoRA (issue 12): a LoRA step on an NF4 / int8 base (`pj.quantize`) vs a bf16 base.

Model: the demo's Llama-style decoder (`peftjax.demo.TinyLlama`) at hidden 512, intermediate
1376, 4 layers (``--quick``: hidden 256, inter 688, 2 layers), random initial weights in bf16,
character vocabulary of the shipped corpus. LoRA r = 16 on every linear layer (``all-linear``,
alpha 32), adapters float32, Adam 3e-3, batch 16 x 64 of the demo's text. Rows, side by side
in one run, one ``jax.jit`` step each (``value_and_grad`` w.r.t. ``pj.partition``'s trainable
half + Adam):

  * bf16 base: the frozen weights stored bf16 (the QLoRA paper's baseline);
  * NF4 base: the same bf16 weights quantized (blocks of 64, double quantization), decoded to
    bf16 inside the step, one matmul at a time (`peftjax.forward`);
  * int8 base: per-channel int8.

Reported: the compiled step's argument bytes and temp bytes (XLA ``memory_analysis``,
deterministic) and the frozen weights' stored bytes; median / min step time of round-robin
rounds (warm-up excluded); and the training curve of ``--steps`` (default 200) steps of each
from the same adapter init and the same batches: final loss, mean loss over the last 20 steps
and its ratio to bf16's, and the largest gap between the curves (20-step moving averages).
Run: ``python benchmarks/qlora.py [--quick] [--steps N] [--curves FILE.csv]``.
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
import optax  # noqa: E402
from _common import compile_fn, machine_info, mb, memory, round_robin, table  # noqa: E402

import peftjax as pj  # noqa: E402
from peftjax import demo  # noqa: E402


def measure(hidden=512, inter=1376, layers=4, rounds=10, steps=200, batch=16, seq=64):
    """Compiled memory, frozen-weight bytes, step times and (``steps`` > 0) loss curves of the
    bf16 / NF4 / int8 rows (used by ``main`` and ``run.py``).

    Returns ``(names, mems, med, mn, curves)``: ``mems[name] = (memory dict, weight bytes)``.
    """
    text = demo.load_corpus()
    tok = demo.CharTokenizer(text)
    data = tok.encode(text)
    model = demo.TinyLlama(len(tok.chars), hidden=hidden, layers=layers, heads=8, inter=inter)
    f32 = model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), f32)
    bases = {
        "bf16 base": bf16,
        "NF4 base": pj.quantize(bf16, scheme="nf4"),
        "int8 base": pj.quantize(bf16, scheme="int8"),
    }
    cfg = pj.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    opt = optax.adam(3e-3)
    fwd = pj.apply(model.apply)

    def loss_fn(trainable, frozen, x, y):
        logits = fwd(pj.combine(trainable, frozen), x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(trainable, frozen, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    it = demo.batches(data, batch, seq, 0)
    xs = [next(it) for _ in range(max(steps, 1))]
    x0, y0 = xs[0]
    runs, mems = {}, {}
    for name, base in bases.items():
        params = pj.inject(base, cfg, key=jax.random.key(1))  # same adapter init for every row
        tr, fr = pj.partition(params)
        st = opt.init(tr)
        exe = compile_fn(step, tr, fr, st, x0, y0)  # timed and analysed: compiled once
        mems[name] = (memory(exe), demo.weight_bytes(base))
        runs[name] = (tr, fr, st, exe)

    def timed(name):
        tr, fr, st, exe = runs[name]
        return lambda: jax.block_until_ready(exe(tr, fr, st, x0, y0))

    med, mn, _ = round_robin({k: timed(k) for k in bases}, rounds, warmup=2)
    curves = {}
    for name in bases if steps else ():
        tr, fr, st, exe = runs[name]
        losses = []
        for x, y in xs:
            tr, st, loss = exe(tr, fr, st, x, y)
            losses.append(loss)
        curves[name] = np.asarray(jax.device_get(losses), np.float64)
    return list(bases), mems, med, mn, curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--curves", default=None, help="write the loss curves to this CSV file")
    args = ap.parse_args()
    hidden, inter, layers = (256, 688, 2) if args.quick else (512, 1376, 4)
    rounds = args.rounds or (4 if args.quick else 10)
    batch, seq = 16, 64
    bases, mems, med, mn, curves = measure(hidden, inter, layers, rounds, args.steps, batch, seq)
    vocab = len(demo.CharTokenizer(demo.load_corpus()).chars)
    ref = curves["bf16 base"]

    def smooth(c):
        k = min(20, len(c))
        return np.convolve(c, np.ones(k) / k, mode="valid")

    rows = []
    for name in bases:
        m, wbytes = mems[name]
        c = curves[name]
        last = c[-20:].mean()
        gap = np.max(np.abs(smooth(c) - smooth(ref)) / smooth(ref))
        whole = c.mean() / ref.mean()
        rows.append(
            [
                name,
                f"{wbytes / 2**20:.2f}",
                mb(m["args"]),
                f"{mems['bf16 base'][0]['args'] / m['args']:.2f}x",
                mb(m["temp"]),
                f"{med[name] * 1e3:.1f} / {mn[name] * 1e3:.1f}",
                f"{med[name] / med['bf16 base']:.2f}x",
                f"{c[0]:.3f} -> {c[-1]:.3f}",
                f"{last:.4f}",
                f"{last / ref[-20:].mean():.4f}",
                f"{whole:.4f}",
                f"{gap * 100:.2f}%",
            ]
        )
    if args.curves:
        with open(args.curves, "w") as f:
            f.write("step," + ",".join(bases) + "\n")
            for i in range(args.steps):
                f.write(f"{i + 1}," + ",".join(f"{curves[n][i]:.5f}" for n in bases) + "\n")
    print(machine_info())
    print(
        f"demo TinyLlama hidden {hidden}, inter {inter}, {layers} layers, vocab {vocab}; "
        f"LoRA r=16 all-linear; batch {batch}x{seq}; {args.steps} steps; median of {rounds} rounds"
    )
    print(
        table(
            [
                "base",
                "frozen weights MiB",
                "step arg MiB",
                "bf16 args / args",
                "step temp MiB",
                "step ms median / min",
                "time vs bf16",
                "loss first -> last",
                "mean loss last 20",
                "vs bf16",
                "mean loss, all steps, vs bf16",
                "max curve gap (20-step avg)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
