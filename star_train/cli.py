"""Command line: ``star-train demo``."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="star-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="CKD on tiny models built from configs (no downloads)")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        result = run(steps=args.steps, seed=args.seed)
        return 0 if result["kl_after"] < result["kl_before"] else 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
