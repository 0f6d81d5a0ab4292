"""Merge an HF PEFT LoRA adapter into a multi-shard HF safetensors checkpoint: peak RSS and time
of `peftjax merge` (streaming, shard by shard) vs HF PEFT's `merge_and_unload()` +
`save_pretrained()` on torch CPU, each in its own process, side by side in one run.

Needs torch, transformers and peft (the benchmark only; peftjax itself never imports them).

    python benchmarks/merge_checkpoint.py            # ~2.2 GB fp32 checkpoint, 16 layers
    python benchmarks/merge_checkpoint.py --quick    # ~0.3 GB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

MAKE = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    base, adapter, layers, hidden, inter, shard = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(base, max_shard_size=shard, safe_serialization=True)
    p = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for n, t in p.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(t, std=0.02)
    p.save_pretrained(adapter)
    """
)

PEFT_MERGE = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaForCausalLM
    from peft import PeftModel
    base, adapter, out, shard = sys.argv[1:5]
    m = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    m.save_pretrained(out, max_shard_size=shard, safe_serialization=True)
    """
)


def rss_of(cmd) -> tuple[float, float]:
    """Run ``cmd`` under a fresh python that reports its child's peak RSS (exact per command)."""
    code = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    layers, hidden, inter, shard = (
        (2, 1024, 2816, "200MB") if args.quick else (16, 1536, 4096, "500MB")
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="peftjax-merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        subprocess.run(
            [
                sys.executable,
                "-c",
                MAKE,
                str(base),
                str(adapter),
                str(layers),
                str(hidden),
                str(inter),
                shard,
            ],
            check=True,
        )
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    n_shards = len(list(base.glob("*.safetensors")))
    rows = []
    t_pj, rss_pj = rss_of(
        [
            sys.executable,
            "-m",
            "peftjax",
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(work / "out_pj"),
        ]
    )
    rows.append(("peftjax merge (streaming)", t_pj, rss_pj))
    t_pt, rss_pt = rss_of(
        [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "out_peft"), shard]
    )
    rows.append(("HF PEFT merge_and_unload + save_pretrained (torch CPU)", t_pt, rss_pt))
    # the two merged checkpoints agree
    import numpy as np
    from safetensors.numpy import load_file

    worst = 0.0
    a = {}
    for f in sorted((work / "out_pj").glob("*.safetensors")):
        a.update(load_file(f))
    for f in sorted((work / "out_peft").glob("*.safetensors")):
        for k, v in load_file(f).items():
            worst = max(worst, float(np.max(np.abs(a[k] - v))))
    print(
        f"checkpoint: {size / 2**30:.2f} GiB fp32 in {n_shards} shards, Llama {layers} layers, hidden {hidden}; LoRA r=16 on 7 projections\n"
    )
    print("| merge | time (s) | peak RSS (MiB) | RSS / checkpoint |")
    print("|---|---|---|---|")
    for name, t, rss in rows:
        print(f"| {name} | {t:.1f} | {rss:,.0f} | {rss * 2**20 / size:.2f} |")
    print(
        f"\nratios peftjax / PEFT: time {t_pj / t_pt:.2f}, peak RSS {rss_pj / rss_pt:.2f}; max |peftjax - PEFT| over all merged weights: {worst:.2e}"
    )


if __name__ == "__main__":
    main()
