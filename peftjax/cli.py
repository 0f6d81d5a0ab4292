"""The ``peftjax`` command line: ``demo``, ``inspect`` and ``merge``."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "peftjax: parameter-efficient fine-tuning for JAX/Flax, compatible with HF PEFT files. "
    "Commands: demo (adapt a small pretrained Llama-style model to two shipped styles), "
    "inspect (summarise an HF PEFT adapter) and merge (fold an HF PEFT adapter into an HF "
    "safetensors checkpoint)."
)


def _demo(args) -> int:
    from .demo import demo_ok, run

    res = run(
        method=args.method,
        rank=args.rank,
        steps=args.steps,
        lr=args.lr,
        out=None if args.no_save else args.out,
        seed=args.seed,
        quantize=args.quantize,
        progress=not args.no_progress,
    )
    return 0 if demo_ok(res) else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``peftjax`` argument parser (every option has a help text)."""
    parser = argparse.ArgumentParser(prog="peftjax", description=DESCRIPTION)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,inspect,merge}",
        help="the command to run (`peftjax <command> --help` for its options)",
    )
    d = sub.add_parser(
        "demo",
        help="adapt a small pretrained Llama-style model to two shipped styles",
        description="Load the small char-level Llama-style Flax model shipped with peftjax "
        "(pretrained on shipped prose by scripts/pretrain_base.py; no network), fine-tune "
        "adapter A on a verse style and adapter B on sums, compare their held-out losses with "
        "the base's, sample from each, merge A and check it, and save both adapters in HF "
        "PEFT's format.",
    )
    from .demo import demos as method_demos

    demos = method_demos()
    ranked = [n for n, (_, has_rank, _) in demos.items() if has_rank]
    d.add_argument(
        "--method",
        default="lora",
        choices=list(demos),
        help="adapter method (default: lora)",
    )
    d.add_argument(
        "--rank",
        type=int,
        default=8,
        help=f"adapter rank for {', '.join(ranked)} "
        f"(not {', '.join(n for n in demos if n not in ranked)})",
    )
    d.add_argument(
        "--steps", type=int, default=150, help="training steps per adapter (default: 150)"
    )
    rates = sorted({lr for _, _, lr in demos.values()})
    d.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: "
        + ", ".join(
            f"{lr:g} {'/'.join(n for n, (_, _, r) in demos.items() if r == lr)}" for lr in rates
        )
        + ")",
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument(
        "--quantize",
        choices=["nf4", "int8"],
        default=None,
        help="quantize the base weights before injecting (QLoRA; default: keep them float)",
    )
    d.add_argument(
        "--out",
        default="peftjax-demo-adapter",
        help="where to save the adapters (in <out>/A/ and <out>/B/, PEFT's layout)",
    )
    d.add_argument("--no-save", action="store_true", help="do not save the adapters")
    d.add_argument(
        "--no-progress", action="store_true", help="do not show the training progress bars"
    )
    d.set_defaults(func=_demo)
    from .cli_files import add_file_commands

    add_file_commands(sub)
    return parser


def main(argv=None) -> int:
    from .errors import PeftJaxError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PeftJaxError as e:
        print(f"peftjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, ...: one line, no traceback
        where = f": `{e.filename}`" if e.filename else ""
        print(f"peftjax {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
