"""LoRA training-step time, side by side in one process: peftjax vs HF PEFT (PyTorch CPU) vs
``flax.nnx.LoRALinear`` vs qwix (when installed).

Every entry is a full ``adam`` step (forward, backward w.r.t. the adapters only, optimizer
update) of next-token cross entropy, LoRA r=16 (alpha 32, no dropout) on q/k/v/o, float32.
Steps run round-robin (one of each per round, after warmup) and the median per entry is
reported with its ratio to the peftjax entry on the same model; the ratios are what is
meaningful on a shared machine.

Models (same shapes: hidden 512, intermediate 1376, 8 heads, vocab 1024):
  * FlaxLlama: transformers' ``FlaxLlamaForCausalLM`` (linen), random weights.
      - peftjax: ``pj.inject`` + ``pj.partition`` + ``jax.grad`` of ``pj.apply(fwd)`` (jit, adam,
        trainable tree and optimizer state donated).
      - naive ``W + s·A·B``: the same step with ``fwd(pj.merge_and_unload(...))`` instead of
        ``pj.apply`` (reference for what factoring saves).
  * HF PEFT: transformers' ``LlamaForCausalLM`` (PyTorch, default SDPA attention) wrapped by
    ``peft.get_peft_model``, ``torch.optim.Adam``; ``torch.set_num_threads`` = the cores XLA
    uses (``os.cpu_count()``), and a second entry with 1 thread (on a loaded machine OpenMP's
    barriers can make more threads much slower).
  * nnx: a small Llama-style ``nnx.Module`` written here (``_common.nnx_llama``):
      - nnx.LoRALinear: q/k/v/o are ``nnx.LoRALinear``; ``nnx.split(model, nnx.LoRAParam, ...)``
        and ``jax.jit`` of the grad w.r.t. the ``LoRAParam`` state.
      - peftjax: the same model with plain ``nnx.Linear``; ``nnx.split`` + ``pj.inject`` on the
        state + ``pj.apply(lambda st, ids: nnx.merge(graphdef, st)(ids))``.
      - qwix: ``qwix.apply_lora_to_model`` on the plain model, then as nnx.LoRALinear.

Run: ``python benchmarks/step_time.py`` (4 layers, batch 4 x seq 256) or ``--quick``
(2 layers, batch 2 x seq 128, fewer repetitions).
The reps/budget flags bound the timed rounds: ``--reps 10 --budget 240`` by default.
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj

RANK = 16


def _jax_step(loss, opt):
    """jit'd adam step ``(t, opt_state, frozen, ids) -> (t, opt_state, loss)``, t/opt donated."""

    def step(t, opt_state, frozen, ids):
        l, g = jax.value_and_grad(loss)(t, frozen, ids)
        upd, opt_state = opt.update(g, opt_state, t)
        return optax.apply_updates(t, upd), opt_state, l

    return jax.jit(step, donate_argnums=(0, 1))


class JaxRunner:
    """Holds the state of one jax training loop; ``__call__`` runs one blocking step."""

    def __init__(self, loss, trainable, frozen, ids, lr=1e-4, opt=None):
        opt = optax.adam(lr) if opt is None else opt
        self.step = _jax_step(loss, opt)
        trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # own copy: it is donated
        self.t, self.o, self.f, self.ids = trainable, opt.init(trainable), frozen, ids
        self.loss = None
        self.compiled = None

    def compile(self):
        """AOT-compile once; the same executable is then timed and cost-analysed."""
        self.compiled = self.step.lower(self.t, self.o, self.f, self.ids).compile()
        return C.flops(self.compiled), C.memory(self.compiled)["peak"]

    def __call__(self):
        if self.compiled is None:
            self.compile()
        self.t, self.o, self.loss = self.compiled(self.t, self.o, self.f, self.ids)
        jax.block_until_ready(self.loss)


def flax_entries(cfg, ids):
    params, fwd = C.flax_llama(cfg)
    q = pj.inject(params, C.lora_config(RANK), key=jax.random.key(1))
    t, f = pj.partition(q)
    fwd_apply = pj.apply(fwd)

    def loss_pj(t, f, ids):
        return C.lm_loss(fwd_apply(pj.combine(t, f), ids), ids)

    def loss_naive(t, f, ids):
        return C.lm_loss(fwd(pj.merge_and_unload(pj.combine(t, f)), ids), ids)

    return {
        "FlaxLlama / peftjax": JaxRunner(loss_pj, t, f, ids),
        "FlaxLlama / naive W + s·A·B": JaxRunner(loss_naive, t, f, ids),
    }


def torch_entry(cfg, ids_np, threads):
    import peft
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(C.ATTN)),
    )
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.as_tensor(np.asarray(ids_np), dtype=torch.long)
    attn = model.base_model.model.config._attn_implementation

    def step():
        torch.set_num_threads(threads)  # global setting: re-set per step (two entries differ)
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    return {f"HF PEFT (torch {torch.__version__}, {attn}, {threads} threads)": step}


def nnx_entries(cfg, ids, with_qwix=True):
    from flax import nnx

    shape = dict(
        hidden=cfg.hidden_size,
        inter=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        vocab=cfg.vocab_size,
    )
    out = {}

    # nnx.LoRALinear
    m = C.nnx_llama(lora_rank=RANK, **shape)
    gdef, lora, rest = nnx.split(m, nnx.LoRAParam, ...)

    def loss_nnx(lora, rest, ids):
        return C.lm_loss(nnx.merge(gdef, lora, rest)(ids), ids)

    out["nnx model / nnx.LoRALinear"] = JaxRunner(loss_nnx, lora, rest, ids)

    # peftjax on the same model with plain nnx.Linear
    plain = C.nnx_llama(lora_rank=None, **shape)
    gdef_p, state = nnx.split(plain)
    q = pj.inject(state, C.lora_config(RANK), key=jax.random.key(1))
    t, f = pj.partition(q)
    fwd_apply = pj.apply(lambda st, ids: nnx.merge(gdef_p, st)(ids))

    def loss_pj(t, f, ids):
        return C.lm_loss(fwd_apply(pj.combine(t, f), ids), ids)

    out["nnx model / peftjax"] = JaxRunner(loss_pj, t, f, ids)

    qwix_note = None
    if with_qwix:
        try:
            import qwix
        except ImportError as e:  # pragma: no cover - depends on the environment
            qwix_note = f"qwix not importable ({e}); skipped"
        else:
            base = C.nnx_llama(lora_rank=None, **shape)
            provider = qwix.LoraProvider(
                module_path=".*(q_proj|k_proj|v_proj|o_proj)", rank=RANK, alpha=float(2 * RANK)
            )
            qm = qwix.apply_lora_to_model(base, provider, ids, rngs=nnx.Rngs(3))
            gdef_q, lora_q, rest_q = nnx.split(qm, nnx.LoRAParam, ...)
            n_lora = C.tree_size(lora_q)

            def loss_q(lora, rest, ids):
                return C.lm_loss(nnx.merge(gdef_q, lora, rest)(ids), ids)

            ver = getattr(qwix, "__version__", "?")
            out[f"nnx model / qwix {ver}"] = JaxRunner(loss_q, lora_q, rest_q, ids)
            qwix_note = f"qwix {ver}: {n_lora:,} LoRA params created"
    return out, qwix_note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds for the timed rounds")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-qwix", action="store_true")
    args = ap.parse_args()
    layers = args.layers or (2 if args.quick else 4)
    batch = args.batch or (2 if args.quick else 4)
    seq = args.seq or (128 if args.quick else 256)
    reps = args.reps or (8 if args.quick else 10)
    budget = args.budget or (60.0 if args.quick else 240.0)
    threads = os.cpu_count()
    t_start = time.perf_counter()

    cfg = C.llama_config(layers=layers)
    ids = C.random_ids(batch, seq, cfg.vocab_size)
    print(
        f"# step_time: hidden {cfg.hidden_size}, inter {cfg.intermediate_size}, {layers} layers, "
        f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}; batch {batch} x seq {seq}; "
        f"LoRA r={RANK} alpha={2 * RANK} on q/k/v/o; adam; float32"
    )
    print(f"# {C.machine_info()}")

    entries = {}
    entries.update(flax_entries(cfg, ids))
    if not args.no_torch:
        entries.update(torch_entry(cfg, ids, threads))
        if threads > 1:  # oversubscribed shared machines can punish OpenMP barriers
            entries.update(torch_entry(cfg, ids, 1))
    nnx_e, qwix_note = nnx_entries(cfg, ids, with_qwix=not args.no_qwix)
    entries.update(nnx_e)
    if qwix_note:
        print(f"# {qwix_note}")

    t0 = time.perf_counter()
    cost = {}
    for k, f in entries.items():  # compile + first call
        s = time.perf_counter()
        if isinstance(f, JaxRunner):
            cost[k] = f.compile()
        f()
        print(f"# compile + first step {k}: {time.perf_counter() - s:.1f}s")
    med, mn, n = C.round_robin(entries, reps=reps, warmup=1, budget_s=budget, pause=0.25)
    print(f"# timed {min(n.values())} rounds in {time.perf_counter() - t0:.0f}s")

    def ref(k, stat):
        group = "nnx model" if k.startswith("nnx") else "FlaxLlama"  # HF PEFT: vs FlaxLlama
        return stat[f"{group} / peftjax"]

    rows = []
    for k in med:
        fl, peak = (C.gf(cost[k][0]), C.mb(cost[k][1])) if k in cost else ("n/a", "n/a")
        rows.append(
            [
                k,
                f"{med[k] * 1e3:.0f}",
                f"{mn[k] * 1e3:.0f}",
                f"{batch * seq / med[k]:,.0f}",
                f"{med[k] / ref(k, med):.2f}",
                f"{mn[k] / ref(k, mn):.2f}",
                n[k],
                fl,
                peak,
            ]
        )
    print("\n## LoRA train step time (round-robin, same process)\n")
    print(
        C.table(
            [
                "framework / method",
                "median ms / step",
                "min ms",
                "tokens / s (median)",
                "÷ peftjax (median)",
                "÷ peftjax (min)",
                "steps timed",
                "XLA GFLOP / step",
                "XLA peak MiB",
            ],
            rows,
        )
    )
    print(
        "\nratios: nnx entries vs `nnx model / peftjax`; FlaxLlama and HF PEFT entries vs "
        "`FlaxLlama / peftjax` (HF PEFT's torch model has the same shapes). GFLOP and peak "
        "MiB: XLA cost / memory analysis of the timed executable (args + outputs + temp − "
        "donated), deterministic, unlike the times on a shared machine."
    )
    print(f"\n# total time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
