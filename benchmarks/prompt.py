"""Prompt learning: the cost of a training step of each activation method (issue 11) against a
LoRA step and the frozen forward, on transformers' FlaxLlama, side by side in one run.

Model: ``FlaxLlamaForCausalLM`` from `_common.llama_config` (hidden 512, inter 1376, 4 layers, 8
heads) with grouped-query attention (2 KV heads), vocab 1024, random weights, float32; batch 4 x
seq 256 (``--quick``: 2 layers, batch 2 x seq 64). Every row is one ``jax.jit`` train step
(``value_and_grad`` w.r.t. ``pj.partition``'s trainable half + ``optax.adam``), next-token cross
entropy on the real tokens, through ``pj.apply`` and, for the prompt methods,
``pj.prompt_inputs``:

  * forward: the frozen model's loss, no gradient (the work every row contains);
  * LoRA r=8 on q/k/v/o (alpha 16): the reference PEFT step;
  * prompt tuning, p-tuning (MLP encoder, hidden 512), multitask prompt tuning (3 tasks, rank
    2): ``T = 16`` virtual tokens, so the backbone runs on ``N + T`` tokens (analytic work
    ratio to a step on ``N`` tokens: ``(N + T) / N``);
  * prefix tuning (``T = 16``, plain and with projection): the ``N`` real tokens attend ``T``
    extra cached keys (``past_key_values`` in the model's own cache);
  * adaption prompt (``adapter_len = 16``, all 4 layers).

Reported per row: XLA FLOPs (``cost_analysis``) and temp bytes (``memory_analysis``), which are
deterministic; median / min step time of round-robin rounds (warm-up excluded); trainable
parameters; ratios to the LoRA step. Run: ``python benchmarks/prompt.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _common import (  # noqa: E402
    ATTN,
    compile_fn,
    flops,
    gf,
    llama_config,
    lm_loss,
    machine_info,
    mb,
    memory,
    random_ids,
    round_robin,
    table,
)

import peftjax as pj  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    layers, batch, seq = (2, 2, 64) if args.quick else (4, 4, 256)
    rounds = args.rounds or (4 if args.quick else 10)
    T = 16
    from transformers import FlaxLlamaForCausalLM

    cfg = llama_config(layers=layers)
    cfg.num_key_value_heads = 2
    model = FlaxLlamaForCausalLM(cfg, seed=0, input_shape=(1, 8))
    base = model.params
    ids = random_ids(batch, seq, cfg.vocab_size)
    tasks = jnp.arange(batch, dtype=jnp.int32) % 3
    fwd = pj.apply(lambda p, b: model(**b, params=p).logits)
    opt = optax.adam(1e-3)
    C = dict(task_type="CAUSAL_LM", num_virtual_tokens=T)
    methods = {
        "LoRA r=8 q/k/v/o": pj.LoraConfig(r=8, lora_alpha=16, target_modules=list(ATTN)),
        "prompt tuning": pj.PromptTuningConfig(**C),
        "p-tuning (MLP)": pj.PromptEncoderConfig(**C, encoder_hidden_size=512),
        "multitask (3 tasks)": pj.MultitaskPromptTuningConfig(**C, num_tasks=3, num_ranks=2),
        "prefix tuning": pj.PrefixTuningConfig.from_model_config(cfg, **C),
        "prefix (projection)": pj.PrefixTuningConfig.from_model_config(
            cfg, **C, prefix_projection=True, encoder_hidden_size=512
        ),
        "adaption prompt": pj.AdaptionPromptConfig(adapter_len=T, adapter_layers=layers),
    }

    def loss_of(p, ids):
        kw = {"task_ids": tasks} if pj.node.is_adapted(_mpt_leaf(p)) else {}
        b = pj.prompt_inputs(p, ids, model=model, **kw)
        return lm_loss(fwd(p, b)[:, -ids.shape[1] :], ids)

    def _mpt_leaf(p):  # multitask prompt tuning needs task ids
        node = p["model"]["embed_tokens"]["embedding"]
        ok = pj.node.is_adapted(node) and any(
            s.method == "multitask_prompt_tuning" for _, s in node.specs
        )
        return node if ok else None

    compiled, calls, info = {}, {}, {}
    fwd_only = compile_fn(lambda p, i: lm_loss(model(i, params=p).logits, i), base, ids)
    compiled["forward (frozen)"] = fwd_only
    calls["forward (frozen)"] = lambda: jax.block_until_ready(fwd_only(base, ids))
    info["forward (frozen)"] = 0
    for name, config in methods.items():
        p = pj.inject(base, config, key=jax.random.key(1))
        t, f = pj.partition(p)
        s = opt.init(t)

        def step(t, s, f, ids):
            loss, g = jax.value_and_grad(lambda t: loss_of(pj.combine(t, f), ids))(t)
            u, s = opt.update(g, s, t)
            return optax.apply_updates(t, u), s, loss

        c = compile_fn(step, t, s, f, ids)
        compiled[name] = c
        calls[name] = lambda c=c, t=t, s=s, f=f: jax.block_until_ready(c(t, s, f, ids))
        info[name] = pj.count_parameters(p)[0]
    med, mn, n = round_robin(calls, rounds, warmup=2)
    ref = "LoRA r=8 q/k/v/o"
    rows = []
    for name, c in compiled.items():
        fl, mem = flops(c), memory(c)
        rows.append(
            [
                name,
                f"{info[name]:,}",
                gf(fl),
                f"{fl / flops(compiled[ref]):.3f}",
                mb(mem["temp"]),
                f"{med[name] * 1e3:.1f}",
                f"{mn[name] * 1e3:.1f}",
                f"{med[name] / med[ref]:.2f}",
            ]
        )
    print(machine_info())
    print(
        f"FlaxLlama hidden {cfg.hidden_size}, {layers} layers, 8 heads / 2 KV heads, vocab "
        f"{cfg.vocab_size}; batch {batch} x seq {seq}; T = {T}; {n[ref]} rounds; analytic "
        f"(N+T)/N = {(seq + T) / seq:.3f}"
    )
    print(
        table(
            [
                "step",
                "trainable",
                "GFLOP",
                "÷ LoRA",
                "temp MiB",
                "median ms",
                "min ms",
                "time ÷ LoRA",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
