"""The ``peftjax`` command line: ``demo``, ``inspect`` and ``merge``."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    res = run(
        method=args.method,
        rank=args.rank,
        steps=args.steps,
        lr=args.lr,
        out=None if args.no_save else args.out,
        seed=args.seed,
    )
    ok = res["loss_after"] < res["loss_before"] and res["merge_diff"] < 1e-3
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peftjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fine-tune a small Llama-style model on shipped text")
    d.add_argument("--method", default="lora", choices=["lora", "dora", "loha", "lokr", "ia3"])
    d.add_argument("--rank", type=int, default=8)
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="peftjax-demo-adapter", help="where to save the adapter")
    d.add_argument("--no-save", action="store_true", help="do not save the adapter")
    d.set_defaults(func=_demo)
    from .cli_files import add_file_commands
    from .errors import PeftJaxError

    add_file_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PeftJaxError as e:
        print(f"peftjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
