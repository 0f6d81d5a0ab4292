"""The single benchmark entry point: every comparison side by side in one process.

    python benchmarks/run.py --out benchmarks      # full run: writes benchmarks/RESULTS.md + plots
    python benchmarks/run.py --quick --out DIR     # tiny sizes, 1-2 rounds: a smoke test

Sections (each a function below, each printed as a rich table and written to RESULTS.md):

  (a) ``step_rank`` / ``step_size``: one AdamW LoRA fine-tune step (forward, backward w.r.t.
      the trainable part, optimizer update) vs LoRA rank and vs model width, on one Llama-style
      model (``_common.nnx_llama``, LoRA on q/k/v/o, alpha = 2r), the same token ids, for:
      full fine-tuning (reference), peftjax (factored, ``pj.apply``), naive ``W + s·A·B`` built
      every step, ``flax.nnx.LoRALinear``, qwix (``qwix.apply_lora_to_model``) and HF PEFT on
      PyTorch CPU (transformers' ``LlamaForCausalLM`` with the same shapes,
      ``torch.optim.AdamW``, ``torch.set_num_threads(os.cpu_count())``). Memory: XLA
      ``memory_analysis()`` of the compiled step for the JAX entries (args + outputs + temp −
      donated, deterministic) and, for every entry including torch, the analytic
      params + grads + AdamW-state bytes (activations excluded).
  (b) ``merge``: merge time vs model size: ``pj.merge_and_unload`` (jit and eager) vs a
      hand-written ``W + s·A·B`` (jit) vs HF PEFT ``merge_and_unload`` (on a fresh copy of the
      model each round, the copy not timed); r = 16 on all 7 projections.
  (c) ``mixed``: mixed-adapter batch throughput vs the number of adapters
      (``mixed_batch.measure``: mixed vs loop vs merge-per-request vs base).
  (d) ``qlora``: a LoRA step on an NF4 / int8 base vs bf16 (``qlora.measure``): compiled
      argument / temp bytes, frozen-weight bytes, step time.
  (e) ``inference``: forward latency unmerged (``pj.apply``) vs merged vs the base model, and
      HF PEFT's unmerged forward on torch.

Every timed entry is compiled and called once before timing (warm-up excluded); times are the
median and the minimum of round-robin rounds (``_common.round_robin``), so the ratios to
peftjax are side by side in one process. A peer that is not importable (or is named in the
environment variable ``PEFTJAX_BENCH_SKIP``, comma separated: ``torch``, ``qwix``, ``nnx``) is
reported as a ``skipped (...)`` row.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from step_time import JaxRunner  # noqa: E402

import peftjax as pj  # noqa: E402

BEGIN, END = "<!-- run.py:begin -->", "<!-- run.py:end -->"
MLP = ("gate_proj", "up_proj", "down_proj")
#: the LoRA target sets of the step section: the sweeps use attention; every set is compared
#: at the sweeps' common point (attention alone once hid a 3x slowdown on MLP targets)
TARGET_SETS = {"attention": C.ATTN, "mlp": MLP, "all-linear": C.ATTN + MLP}
ATTN_SET = "attention"
PJ = "peftjax LoRA"
FULL = "full fine-tune"
NAIVE = "naive W + s·A·B"
NNX = "flax.nnx.LoRALinear"
QWIX = "qwix LoRA"
HF = "HF PEFT (torch CPU)"
HF1 = "HF PEFT (torch CPU, 1 thread)"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ sizes


@dataclass
class Sizes:
    layers: int
    batch: int
    seq: int
    vocab: int
    rank_width: int  # the width of the rank sweep
    ranks: tuple
    widths: tuple  # the size sweep, at rank ``size_rank``
    size_rank: int
    merge_widths: tuple
    merge_layers: int
    mixed: dict
    qlora: dict
    infer_width: int
    rounds: int
    merge_rounds: int
    pause: float
    torch_1thread: bool


FULL_SIZES = Sizes(
    layers=2,
    batch=4,
    seq=128,
    vocab=1024,
    rank_width=512,
    ranks=(4, 16, 64),
    widths=(256, 512, 1024),
    size_rank=16,
    merge_widths=(512, 1024, 2048),
    merge_layers=2,
    mixed=dict(layers=2, seq=32, batch=64, ks=(1, 4, 16, 64), rounds=7),
    qlora=dict(hidden=512, inter=1376, layers=4, rounds=5, batch=16, seq=64),
    infer_width=512,
    rounds=7,
    merge_rounds=7,
    pause=0.1,
    torch_1thread=True,
)

QUICK_SIZES = Sizes(
    layers=1,
    batch=1,
    seq=16,
    vocab=128,
    rank_width=32,
    ranks=(4, 8),
    widths=(32, 64),
    size_rank=4,
    merge_widths=(32, 64),
    merge_layers=1,
    mixed=dict(
        layers=1, seq=8, batch=4, ks=(1, 2), rounds=1, hidden=32, inter=64, heads=2, vocab=128
    ),
    qlora=dict(hidden=64, inter=128, layers=1, rounds=1, batch=2, seq=16),
    infer_width=32,
    rounds=2,
    merge_rounds=2,
    pause=0.02,
    torch_1thread=False,
)


def shape(width, layers, vocab):
    inter = int(round(width * 2.6875 / 8)) * 8  # 512 -> 1376, as _common.llama_config
    heads = max(2, width // 64)
    return dict(hidden=width, inter=inter, layers=layers, heads=heads, vocab=vocab)


# ------------------------------------------------------------------------------------ peers


def skipped_peers() -> set:
    return {s.strip().lower() for s in os.environ.get("PEFTJAX_BENCH_SKIP", "").split(",") if s}


def peer_status(name: str) -> str | None:
    """``None`` if the peer can run, else why it is skipped."""
    if name in skipped_peers():
        return "skipped (PEFTJAX_BENCH_SKIP)"
    mods = {"torch": ("torch", "peft", "transformers"), "qwix": ("qwix",), "nnx": ("flax.nnx",)}
    for m in mods[name]:
        try:
            __import__(m)
        except Exception:  # noqa: BLE001 - any import failure means "not installed" here
            return "skipped (not installed)"
    return None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------ sections


@dataclass
class Section:
    key: str
    title: str
    headers: list
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    plots: list = field(default_factory=list)
    seconds: float = 0.0

    def skip_row(self, name, why):
        self.rows.append([name, why] + ["-"] * (len(self.headers) - 2))


def f1(x):
    return f"{x:.1f}"


def f2(x):
    return f"{x:.2f}"


def f3(x):
    return f"{x:.3f}"


def adamw():
    return optax.adamw(1e-4, weight_decay=0.01)


def state_bytes(all_bytes, trainable_bytes):
    """Parameters + gradients + AdamW's two moments (activations excluded)."""
    return all_bytes + 3 * trainable_bytes


def _nnx_entries(shp, r, ids, status, targets=C.ATTN):
    """Zero-arg step callables (JaxRunner) of the JAX entries and their analytic state bytes,
    LoRA on the projections ``targets``."""
    from flax import nnx

    out, state = {}, {}
    plain = C.nnx_llama(lora_rank=None, **shp)
    gdef, params, rest = nnx.split(plain, nnx.Param, ...)

    def loss_full(p, rest, ids):
        return C.lm_loss(nnx.merge(gdef, p, rest)(ids), ids)

    total = C.tree_bytes(params)
    out[FULL] = JaxRunner(loss_full, params, rest, ids, opt=adamw())
    state[FULL] = state_bytes(total, total)

    gdef_p, st = nnx.split(C.nnx_llama(lora_rank=None, **shp))
    q = pj.inject(st, C.lora_config(r, targets), key=jax.random.key(1))
    t, f = pj.partition(q)
    fwd_apply = pj.apply(lambda s, x: nnx.merge(gdef_p, s)(x))

    def loss_pj(t, f, ids):
        return C.lm_loss(fwd_apply(pj.combine(t, f), ids), ids)

    def loss_naive(t, f, ids):
        merged = pj.merge_and_unload(pj.combine(t, f))
        return C.lm_loss(nnx.merge(gdef_p, merged)(ids), ids)

    tb = C.tree_bytes(t)
    out[PJ] = JaxRunner(loss_pj, t, f, ids, opt=adamw())
    out[NAIVE] = JaxRunner(loss_naive, t, f, ids, opt=adamw())
    state[PJ] = state[NAIVE] = state_bytes(total + tb, tb)

    if status["nnx"] is None:
        m = C.nnx_llama(lora_rank=r, lora_targets=targets, **shp)
        gdef_l, lora, rest_l = nnx.split(m, nnx.LoRAParam, ...)

        def loss_nnx(lora, rest, ids):
            return C.lm_loss(nnx.merge(gdef_l, lora, rest)(ids), ids)

        out[NNX] = JaxRunner(loss_nnx, lora, rest_l, ids, opt=adamw())
        lb = C.tree_bytes(lora)
        state[NNX] = state_bytes(total + lb, lb)

    if status["qwix"] is None:
        import qwix

        provider = qwix.LoraProvider(
            module_path=f".*({'|'.join(targets)})", rank=r, alpha=float(2 * r)
        )
        qm = qwix.apply_lora_to_model(
            C.nnx_llama(lora_rank=None, **shp), provider, ids, rngs=nnx.Rngs(3)
        )
        gdef_q, lora_q, rest_q = nnx.split(qm, nnx.LoRAParam, ...)

        def loss_q(lora, rest, ids):
            return C.lm_loss(nnx.merge(gdef_q, lora, rest)(ids), ids)

        out[QWIX] = JaxRunner(loss_q, lora_q, rest_q, ids, opt=adamw())
        qb = C.tree_bytes(lora_q)
        state[QWIX] = state_bytes(total + qb, qb)
    return out, state


def _torch_model(shp, r, targets, seed=0):
    import peft
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = C.llama_config(
        hidden=shp["hidden"],
        inter=shp["inter"],
        layers=shp["layers"],
        heads=shp["heads"],
        vocab=shp["vocab"],
    )
    model = LlamaForCausalLM(cfg)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
    return peft.get_peft_model(model, cfg)


def _torch_step(shp, r, ids, threads, targets=C.ATTN):
    import torch

    torch.set_num_threads(threads)
    model = _torch_model(shp, r, targets)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long)

    def step():
        torch.set_num_threads(threads)  # a global setting: two entries differ
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tb = sum(p.numel() * p.element_size() for p in trainable)
    return step, state_bytes(total, tb)


def step_records(sz: Sizes, points, status):
    """One record per (point, entry): median / min seconds, XLA peak, analytic state bytes."""
    recs = []
    ids = C.random_ids(sz.batch, sz.seq, sz.vocab)
    for width, r, tset in points:
        shp = shape(width, sz.layers, sz.vocab)
        t0 = time.perf_counter()
        targets = TARGET_SETS[tset]
        entries, state = _nnx_entries(shp, r, ids, status, targets)
        peak = {}
        for k, runner in entries.items():
            peak[k] = runner.compile()[1]
            runner()
        if status["torch"] is None:
            threads = os.cpu_count() or 1
            entries[HF], state[HF] = _torch_step(shp, r, ids, threads, targets)
            entries[HF]()
            if threads > 1 and sz.torch_1thread:  # OpenMP on a loaded machine: see the notes
                entries[HF1], state[HF1] = _torch_step(shp, r, ids, 1, targets)
                entries[HF1]()
        med, mn, n = C.round_robin(entries, reps=sz.rounds, warmup=1, pause=sz.pause)
        for k in entries:
            recs.append(
                dict(
                    entry=k,
                    width=width,
                    r=r,
                    targets=tset,
                    med=med[k],
                    min=mn[k],
                    rounds=n[k],
                    peak=peak.get(k),
                    state=state[k],
                )
            )
        log(
            f"[step] width {width} r {r} {tset}: "
            + ", ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in entries)
            + f" ({time.perf_counter() - t0:.0f}s)"
        )
    return recs


STEP_HEADERS = [
    "entry",
    "r",
    "width",
    "median ms",
    "min ms",
    "÷ peftjax (median)",
    "÷ peftjax (min)",
    "XLA peak MiB",
    "params+grads+AdamW MiB",
]


def _step_rows(recs, sec: Section, status, by_targets=False):
    """One row per record, its ratios to peftjax at the same point (width, rank, targets);
    ``by_targets``: the entry column names the target set too."""
    point = lambda x: (x["width"], x["r"], x["targets"])  # noqa: E731
    for rec in recs:
        ref = next(x for x in recs if x["entry"] == PJ and point(x) == point(rec))
        sec.rows.append(
            [
                f"{rec['entry']} · {rec['targets']}" if by_targets else rec["entry"],
                rec["r"],
                rec["width"],
                f1(rec["med"] * 1e3),
                f1(rec["min"] * 1e3),
                f2(rec["med"] / ref["med"]),
                f2(rec["min"] / ref["min"]),
                f1(rec["peak"] / 2**20) if rec["peak"] is not None else "-",
                f1(rec["state"] / 2**20),
            ]
        )
    for peer, name in (("torch", HF), ("qwix", QWIX), ("nnx", NNX)):
        if status[peer] is not None:
            sec.skip_row(name, status[peer])


def section_steps(sz: Sizes, status, plots_dir):
    """(a) LoRA fine-tune step time and memory vs rank and vs width, all peers side by side."""
    t0 = time.perf_counter()
    points = [(sz.rank_width, r, ATTN_SET) for r in sz.ranks]
    points += [
        (w, sz.size_rank, ATTN_SET) for w in sz.widths if (w, sz.size_rank, ATTN_SET) not in points
    ]
    points += [(sz.rank_width, sz.size_rank, t) for t in TARGET_SETS if t != ATTN_SET]
    all_recs = step_records(sz, points, status)
    recs = [x for x in all_recs if x["targets"] == ATTN_SET]  # the rank and width sweeps
    shp = shape(sz.rank_width, sz.layers, sz.vocab)
    common = (
        f"nnx Llama-style model ({sz.layers} layers, vocab {sz.vocab}, inter ≈ 2.69 × width, "
        f"heads = width / 64), batch {sz.batch} × seq {sz.seq}, LoRA on {{targets}}, alpha = 2r, "
        f"AdamW(1e-4, wd 0.01), float32; median / min of {sz.rounds} round-robin rounds after "
        "a compile + first call and one warm-up round. HF PEFT: transformers' LlamaForCausalLM "
        f"with the same shapes, torch.set_num_threads({os.cpu_count()}) (the cores XLA uses; "
        "the full run adds a 1-thread row: on an oversubscribed machine OpenMP's spinning "
        "barriers can make more threads much slower). `÷ peftjax`: the "
        "entry's time over peftjax's at the same point (< 1: faster than peftjax). XLA peak: "
        "compiled args + outputs + temp − donated (JAX entries only); params+grads+AdamW: "
        "analytic bytes of all parameters, the trainable gradients and AdamW's two moments, for "
        "every entry (torch included; activations excluded)."
    )
    by_rank = Section("step_rank", "(a) fine-tune step vs LoRA rank", STEP_HEADERS)
    _step_rows([x for x in recs if x["width"] == sz.rank_width], by_rank, status)
    attn = common.format(targets="q/k/v/o")
    by_rank.notes.append(f"width {sz.rank_width} (hidden {shp['hidden']}). " + attn)
    by_size = Section("step_size", "(a) fine-tune step vs model width", STEP_HEADERS)
    order = {k: i for i, k in enumerate(x["entry"] for x in recs)}
    at_rank = [x for x in recs if x["r"] == sz.size_rank]
    _step_rows(sorted(at_rank, key=lambda x: (x["width"], order[x["entry"]])), by_size, status)
    by_size.notes.append(f"r = {sz.size_rank}. " + attn)
    by_targets = Section("step_targets", "(a) fine-tune step by LoRA target set", STEP_HEADERS)
    at_point = [x for x in all_recs if x["width"] == sz.rank_width and x["r"] == sz.size_rank]
    tsets = list(TARGET_SETS)
    at_point.sort(key=lambda x: (tsets.index(x["targets"]), order[x["entry"]]))
    _step_rows(at_point, by_targets, status, by_targets=True)
    sets = "; ".join(f"{k}: {'/'.join(v)}" for k, v in TARGET_SETS.items())
    by_targets.notes.append(
        f"width {sz.rank_width}, r = {sz.size_rank}; target sets {sets}. "
        + common.format(targets="the set's projections")
    )
    if plots_dir:
        by_rank.plots += [
            _plot_lines(
                recs,
                "r",
                sz.rank_width,
                "width",
                "med",
                plots_dir / "step_time_vs_rank.png",
                "LoRA rank r",
                "median step time (ms)",
                f"Fine-tune step time vs rank (width {sz.rank_width})",
            ),
            _plot_memory(
                recs, "r", sz.rank_width, "width", plots_dir / "memory_vs_rank.png", "LoRA rank r"
            ),
        ]
        by_size.plots += [
            _plot_lines(
                recs,
                "width",
                sz.size_rank,
                "r",
                "med",
                plots_dir / "step_time_vs_size.png",
                "model width (hidden size)",
                "median step time (ms)",
                f"Fine-tune step time vs model width (r = {sz.size_rank})",
            ),
            _plot_memory(
                recs,
                "width",
                sz.size_rank,
                "r",
                plots_dir / "memory_vs_size.png",
                "model width (hidden size)",
            ),
        ]
    by_rank.seconds = by_size.seconds = by_targets.seconds = time.perf_counter() - t0
    return [by_rank, by_size, by_targets], recs


def _naive_merge(params):
    """Hand-written merge: ``W + scaling · A @ B`` on every adapted leaf (dense, not stacked)."""

    def one(x):
        if not isinstance(x, pj.Adapted):
            return x
        w = x.base
        for name in x.active:
            spec = dict(x.specs)[name]
            a = x.arrays[name]
            w = w + spec.scaling[0] * (a["lora_A"] @ a["lora_B"]).astype(w.dtype)
        return w

    return jax.tree_util.tree_map(one, params, is_leaf=lambda x: isinstance(x, pj.Adapted))


def _timed_rounds(entries, reps, warmup=1):
    """Round-robin of ``(setup, fn)`` pairs: ``fn(setup())`` is timed, ``setup()`` is not."""
    times = {k: [] for k in entries}
    for i in range(warmup + reps):
        items = list(entries.items())
        for k, (setup, fn) in items[::-1] if i % 2 else items:
            arg = setup()
            t0 = time.perf_counter()
            fn(arg)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
            del arg
    return {k: float(np.median(v)) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def section_merge(sz: Sizes, status, plots_dir):
    """(b) merge time vs model size: peftjax vs hand-written W + s·A·B vs HF PEFT."""
    from flax import nnx

    t0 = time.perf_counter()
    targets = C.ATTN + MLP
    sec = Section(
        "merge",
        "(b) merge time vs model size",
        ["entry", "width", "params M", "median ms", "min ms", "÷ peftjax jit (median)"],
    )
    recs = []
    jit_merge = jax.jit(pj.merge_and_unload)
    jit_naive = jax.jit(_naive_merge)
    for width in sz.merge_widths:
        shp = shape(width, sz.merge_layers, sz.vocab)
        _, st = nnx.split(C.nnx_llama(lora_rank=None, **shp))
        q = C.randomize_lora_b(
            pj.inject(st, C.lora_config(16, targets), key=jax.random.key(1)), jax.random.key(2)
        )
        n_params = C.tree_size(st)
        same = lambda q=q: q  # noqa: E731 - the JAX merges are not in place: no copy needed
        entries = {
            "peftjax merge_and_unload (jit)": (same, lambda p: jax.block_until_ready(jit_merge(p))),
            "peftjax merge_and_unload (eager)": (
                same,
                lambda p: jax.block_until_ready(pj.merge_and_unload(p)),
            ),
            "naive W + s·A·B (jit)": (same, lambda p: jax.block_until_ready(jit_naive(p))),
        }
        if status["torch"] is None:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            tm = _torch_model(shp, 16, targets)
            for name, p in tm.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
            entries["HF PEFT merge_and_unload (torch CPU)"] = (
                lambda tm=tm: copy.deepcopy(tm),
                lambda m: m.merge_and_unload(),
            )
        med, mn = _timed_rounds(entries, sz.merge_rounds)
        for k in entries:
            recs.append(dict(entry=k, width=width, n=n_params, med=med[k], min=mn[k]))
        ref = med["peftjax merge_and_unload (jit)"]
        for k in entries:
            sec.rows.append(
                [k, width, f2(n_params / 1e6), f2(med[k] * 1e3), f2(mn[k] * 1e3), f2(med[k] / ref)]
            )
        log(f"[merge] width {width}: " + ", ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in med))
        del q, st, entries, same
    if status["torch"] is not None:
        sec.skip_row("HF PEFT merge_and_unload (torch CPU)", status["torch"])
    sec.notes.append(
        f"nnx Llama-style model, {sz.merge_layers} layers, LoRA r = 16 (random B) on "
        "q/k/v/o/gate/up/down, float32, in memory (no files). The JAX merges are compiled and "
        "called once before timing; HF PEFT merges a fresh `copy.deepcopy` of the PeftModel "
        f"each round (the copy is not timed); median / min of {sz.merge_rounds} rounds after one "
        "warm-up round. `params M`: the base model's parameters."
    )
    if plots_dir:
        sec.plots.append(_plot_merge(recs, plots_dir / "merge_vs_size.png"))
    sec.seconds = time.perf_counter() - t0
    return [sec], recs


def section_mixed(sz: Sizes, status, plots_dir):
    """(c) mixed-adapter batch throughput vs the number of adapters (mixed_batch.measure)."""
    import mixed_batch

    t0 = time.perf_counter()
    kw = dict(sz.mixed)
    res = mixed_batch.measure(log=log, **kw)
    sec = Section(
        "mixed",
        "(c) mixed-adapter batch throughput vs number of adapters",
        [
            "K adapters",
            "mixed tok/s",
            "loop tok/s",
            "merge/request tok/s",
            "base tok/s",
            "loop ÷ mixed (time)",
            "merge ÷ mixed (time)",
            "mixed ÷ base (time)",
            "mixed ÷ base (FLOPs)",
        ],
    )
    for r in res:
        med = r["med"]
        sec.rows.append(
            [
                r["k"],
                f"{r['tok_s']['mixed']:.0f}",
                f"{r['tok_s']['loop']:.0f}",
                f"{r['tok_s']['merge']:.0f}",
                f"{r['tok_s']['base']:.0f}",
                f2(med["loop"] / med["mixed"]),
                f2(med["merge"] / med["mixed"]),
                f2(med["mixed"] / med["base"]),
                f3(r["flops_mixed"] / r["flops_base"]),
            ]
        )
    sec.notes.append(
        f"FlaxLlama hidden {kw.get('hidden', 512)}, {kw['layers']} layers; a prefill forward "
        f"of {kw['batch']} requests × {kw['seq']} tokens, request i uses adapter i % K (LoRA "
        "r = 8 on q/k/v/o, random B). mixed: `pj.apply(fwd, adapter_ids=ids)`; loop: one call "
        "per adapter on its requests; merge/request: `pj.merge_and_unload` per adapter then "
        f"the merged forward; base: the frozen model. Medians of {kw['rounds']} round-robin "
        "rounds after one warm-up (`benchmarks/mixed_batch.py`)."
    )
    if plots_dir:
        sec.plots.append(_plot_mixed(res, plots_dir / "mixed_vs_adapters.png"))
    sec.seconds = time.perf_counter() - t0
    return [sec], res


def section_qlora(sz: Sizes, status, plots_dir):
    """(d) QLoRA memory: a LoRA step on NF4 / int8 vs bf16 frozen weights (qlora.measure)."""
    import qlora

    t0 = time.perf_counter()
    kw = dict(sz.qlora)
    names, mems, med, mn, _ = qlora.measure(steps=0, **kw)
    sec = Section(
        "qlora",
        "(d) QLoRA memory",
        [
            "base",
            "frozen weights MiB",
            "step arg MiB",
            "bf16 args ÷ args",
            "step temp MiB",
            "median ms",
            "min ms",
            "time ÷ bf16",
        ],
    )
    ref = mems["bf16 base"][0]["args"]
    for n in names:
        m, wb = mems[n]
        sec.rows.append(
            [
                n,
                f2(wb / 2**20),
                f2(m["args"] / 2**20),
                f2(ref / m["args"]),
                f2(m["temp"] / 2**20),
                f1(med[n] * 1e3),
                f1(mn[n] * 1e3),
                f2(med[n] / med["bf16 base"]),
            ]
        )
    sec.notes.append(
        f"demo TinyLlama hidden {kw['hidden']}, inter {kw['inter']}, {kw['layers']} layers; "
        f"LoRA r = 16 all-linear (float32 adapters), Adam, batch {kw['batch']} × {kw['seq']}. "
        "Bytes: XLA `memory_analysis()` of the compiled step (deterministic) and the stored "
        f"frozen weights; times: median / min of {kw['rounds']} round-robin rounds "
        "(`benchmarks/qlora.py`; its full run also trains 200 steps and compares loss curves)."
    )
    if plots_dir:
        sec.plots.append(_plot_qlora(names, mems, plots_dir / "qlora_memory.png"))
    sec.seconds = time.perf_counter() - t0
    return [sec], mems


def section_inference(sz: Sizes, status, plots_dir):
    """(e) forward latency: unmerged pj.apply vs merged vs base, and HF PEFT unmerged."""
    from flax import nnx

    t0 = time.perf_counter()
    shp = shape(sz.infer_width, sz.layers, sz.vocab)
    ids = C.random_ids(sz.batch, sz.seq, sz.vocab)
    gdef, st = nnx.split(C.nnx_llama(lora_rank=None, **shp))
    q = C.randomize_lora_b(
        pj.inject(st, C.lora_config(16), key=jax.random.key(1)), jax.random.key(2)
    )
    merged = jax.jit(pj.merge_and_unload)(q)

    def fwd(s, x):
        return nnx.merge(gdef, s)(x)

    unmerged_c = C.compile_fn(pj.apply(fwd), q, ids)
    base_c = C.compile_fn(fwd, st, ids)
    merged_c = C.compile_fn(fwd, merged, ids)
    flops = {
        "peftjax unmerged (pj.apply)": C.flops(unmerged_c),
        "peftjax merged": C.flops(merged_c),
        "base model": C.flops(base_c),
    }
    fns = {
        "peftjax unmerged (pj.apply)": lambda: jax.block_until_ready(unmerged_c(q, ids)),
        "peftjax merged": lambda: jax.block_until_ready(merged_c(merged, ids)),
        "base model": lambda: jax.block_until_ready(base_c(st, ids)),
    }
    if status["torch"] is None:
        import torch

        tm = _torch_model(shp, 16, C.ATTN)
        tm.eval()
        x = torch.as_tensor(np.asarray(ids), dtype=torch.long)

        torch.set_num_threads(os.cpu_count() or 1)

        def torch_fwd():
            with torch.no_grad():
                tm(input_ids=x)

        fns[HF + " unmerged"] = torch_fwd
    for f in fns.values():
        f()
    med, mn, n = C.round_robin(fns, reps=max(sz.rounds * 2, 2), warmup=1, pause=sz.pause)
    ref = med["peftjax unmerged (pj.apply)"]
    sec = Section(
        "inference",
        "(e) inference: unmerged vs merged forward",
        ["entry", "median ms", "min ms", "÷ peftjax unmerged", "÷ base", "XLA GFLOP"],
    )
    for k in fns:
        sec.rows.append(
            [
                k,
                f2(med[k] * 1e3),
                f2(mn[k] * 1e3),
                f2(med[k] / ref),
                f2(med[k] / med["base model"]),
                f3(flops[k] / 1e9) if k in flops else "-",
            ]
        )
    if status["torch"] is not None:
        sec.skip_row(HF + " unmerged", status["torch"])
    sec.notes.append(
        f"nnx Llama-style model, width {sz.infer_width}, {sz.layers} layers, batch {sz.batch} × "
        f"{sz.seq}, LoRA r = 16 on q/k/v/o (random B); medians of {min(n.values())} round-robin "
        "rounds. HF PEFT: the unmerged PeftModel's forward under `torch.no_grad()`."
    )
    sec.seconds = time.perf_counter() - t0
    return [sec], None


SECTIONS = {
    "steps": section_steps,
    "merge": section_merge,
    "mixed": section_mixed,
    "qlora": section_qlora,
    "inference": section_inference,
}


# ------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {
    FULL: dict(color="black", marker="s", ls="--"),
    PJ: dict(color="tab:red", marker="o", lw=2.5),
    NAIVE: dict(color="tab:orange", marker="v"),
    NNX: dict(color="tab:blue", marker="^"),
    QWIX: dict(color="tab:green", marker="D"),
    HF: dict(color="tab:purple", marker="x"),
    HF1: dict(color="tab:purple", marker="+", ls=":"),
}


def _xticks(ax, xs):
    """Plain tick labels at the measured x values (not powers of two)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _series(recs, x, fixed_val, fixed_key, y):
    out = {}
    for rec in recs:
        if rec[fixed_key] == fixed_val and rec[y] is not None:
            out.setdefault(rec["entry"], []).append((rec[x], rec[y]))
    return {k: sorted(v) for k, v in out.items()}


def _plot_lines(recs, x, fixed_val, fixed_key, y, path, xlabel, ylabel, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, pts in _series(recs, x, fixed_val, fixed_key, y).items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, [v * 1e3 for v in ys], label=k, **STYLE.get(k, {}))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _xticks(ax, [rec[x] for rec in recs if rec[fixed_key] == fixed_val])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_memory(recs, x, fixed_val, fixed_key, path, xlabel):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y, ylabel in (
        (axes[0], "peak", "XLA compiled peak (MiB), JAX entries"),
        (axes[1], "state", "params + grads + AdamW state (MiB)"),
    ):
        for k, pts in _series(recs, x, fixed_val, fixed_key, y).items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, [v / 2**20 for v in ys], label=k, **STYLE.get(k, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _xticks(ax, [rec[x] for rec in recs if rec[fixed_key] == fixed_val])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Fine-tune step memory vs {xlabel} ({fixed_key} = {fixed_val})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_merge(recs, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for rec in recs:
        series.setdefault(rec["entry"], []).append((rec["n"] / 1e6, rec["med"] * 1e3))
    for k, pts in series.items():
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", label=k, lw=2.5 if "(jit)" in k and "peftjax" in k else 1.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("base model parameters (M)")
    ax.set_ylabel("median merge time (ms)")
    ax.set_title("merge_and_unload time vs model size (LoRA r=16, 7 projections)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_mixed(res, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = [r["k"] for r in res]
    labels = {
        "mixed": "mixed batch (pj.apply adapter_ids)",
        "loop": "loop over adapters",
        "merge": "merge per request",
        "base": "base model (no adapter)",
    }
    for name, label in labels.items():
        ax.plot(ks, [r["tok_s"][name] for r in res], marker="o", label=label)
    ax.set_xscale("log", base=2)
    _xticks(ax, ks)
    ax.set_xlabel("number of adapters K in the batch")
    ax.set_ylabel("tokens / s (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Mixed-adapter batch throughput vs number of adapters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_qlora(names, mems, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.arange(len(names))
    w = 0.27
    parts = (
        ("frozen weights", [mems[n][1] for n in names]),
        ("step arguments", [mems[n][0]["args"] for n in names]),
        ("step temp", [mems[n][0]["temp"] for n in names]),
    )
    for i, (label, vals) in enumerate(parts):
        ax.bar(xs + (i - 1) * w, [v / 2**20 for v in vals], w, label=label)
    ax.set_xticks(xs, names)
    ax.set_ylabel("MiB")
    ax.set_title("QLoRA: compiled step memory by frozen-weight format")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------------------------ output


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    vers = {
        d: version(d)
        for d in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "peft", "transformers")
    }
    vers["qwix"] = version("qwix")
    vers["peftjax"] = version("peftjax")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "backend": f"{jax.default_backend()}, {jax.device_count()} device(s)",
        "versions": vers,
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_sections(sections, console=None):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=400, color_system=None, highlight=False, soft_wrap=True)
    for sec in sections:
        console.print(f"\n=== section: {sec.key} === {sec.title} ({sec.seconds:.0f}s)")
        t = Table(box=box.MARKDOWN, show_edge=True)
        for h in sec.headers:
            t.add_column(h, no_wrap=True)
        for row in sec.rows:
            t.add_row(*[str(c) for c in row])
        console.print(t)
        for n in sec.notes:
            console.print(n)


def headline(recs, sz: Sizes):
    """The step table at the rank sweep's reference point (width, size_rank), as markdown."""
    pts = [x for x in recs if x["width"] == sz.rank_width and x["r"] == sz.size_rank]
    if not pts:
        return ""
    ref = next(x for x in pts if x["entry"] == PJ)
    rows = []
    for x in pts:
        rows.append(
            [
                x["entry"],
                f1(x["med"] * 1e3),
                f2(x["med"] / ref["med"]),
                f1(x["peak"] / 2**20) if x["peak"] is not None else "-",
                f1(x["state"] / 2**20),
            ]
        )
    return C.table(
        ["LoRA fine-tune step", "median ms", "÷ peftjax", "XLA peak MiB", "params+grads+AdamW MiB"],
        rows,
    )


def results_block(sections, info, command, sz: Sizes, step_recs, quick) -> str:
    v = info["versions"]
    out = [
        BEGIN,
        "## Latest `benchmarks/run.py` run (auto-generated, do not edit by hand)",
        "",
        f"- Date: {info['date']}. Command: `{command}`"
        + (" (**--quick**: tiny sizes, the ratios mean nothing)" if quick else ""),
        f"- Machine: {info['cpu']}, {info['cores']} cores visible, load average "
        f"{info['load']:.1f} at start; JAX backend {info['backend']}.",
        f"- Versions: Python {info['python']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "- Every comparison below ran side by side in one process (round-robin rounds, warm-up "
        "excluded), so the ratios to peftjax are like-for-like; the absolute times depend on "
        "the machine's load (it is shared). XLA memory numbers are deterministic.",
        "",
    ]
    head = headline(step_recs or [], sz)
    if head:
        out += [
            f"**Headline** (width {sz.rank_width}, r = {sz.size_rank}, batch {sz.batch} × "
            f"{sz.seq}):",
            "",
            head,
            "",
        ]
    for sec in sections:
        out += [f"### {sec.title}", "", C.table(sec.headers, sec.rows), ""]
        out += [n + "\n" for n in sec.notes]
        for p in sec.plots:
            out.append(f"![{p}](plots/{p})")
        if sec.plots:
            out.append("")
        out.append(f"({sec.seconds:.0f} s)\n")
    out.append(
        "_The hand-written sections below this block come from earlier runs of the individual "
        "scripts (`benchmarks/*.py`), each with its own date, sizes and commands._"
    )
    out.append(END)
    return "\n".join(out) + "\n"


def write_results(path: Path, block: str):
    text = path.read_text() if path.exists() else "# peftjax benchmark results\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        lines = text.splitlines(keepends=True)
        if lines and lines[0].startswith("# "):
            text = lines[0] + "\n" + block + "\n" + "".join(lines[1:]).lstrip("\n")
        else:
            text = block + "\n" + text
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 rounds (a smoke test)")
    ap.add_argument(
        "--out",
        default=None,
        help="directory for RESULTS.md and plots/ (default: benchmarks/ for a full run, a new "
        "temporary directory with --quick, so that --quick never overwrites the real results)",
    )
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison")
    args = ap.parse_args(argv)
    sz = copy.deepcopy(QUICK_SIZES if args.quick else FULL_SIZES)
    if args.rounds:
        sz.rounds = sz.merge_rounds = args.rounds
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="peftjax-bench-quick-"))
    else:
        out = HERE
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    status = {p: peer_status(p) for p in ("torch", "qwix", "nnx")}
    log(f"[run] out {out}; peers: " + ", ".join(f"{k}: {v or 'ok'}" for k, v in status.items()))
    t_all = time.perf_counter()
    sections, step_recs = [], None
    for name in wanted:
        log(f"[run] section {name} ...")
        secs, data = SECTIONS[name](sz, status, plots_dir)
        if name == "steps":
            step_recs = data
        sections += secs
        print_sections(secs)
    total = time.perf_counter() - t_all
    head = headline(step_recs or [], sz)
    if head:
        print("\n=== headline ===\n" + head)
    block = results_block(sections, info, command.strip(), sz, step_recs, args.quick)
    write_results(out / "RESULTS.md", block)
    print(
        f"\n# wrote {out / 'RESULTS.md'} and {len(list(plots_dir.glob('*.png')))} plots in "
        f"{plots_dir}; total {total:.0f}s"
    )


if __name__ == "__main__":
    main()
