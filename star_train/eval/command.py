"""``star-train eval``: its command-line options and what it runs."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--categories", default=None,
                        help="comma-separated BFCL categories (default: all supported)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per category")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--results", default=None, help="write per-sample results (jsonl) here")
    parser.add_argument("--out", default=None, help="write the summary (json) here")


def run(args) -> int:
    from ..chat.tokenizer import qwen3_tokenizer
    from ..runtime.config import ModelSpec
    from ..runtime.models import DTYPES, load_model, resolve_device
    from . import bfcl

    categories = args.categories.split(",") if args.categories else bfcl.CATEGORIES
    model = load_model(ModelSpec(path=args.model), DTYPES[args.dtype],
                       resolve_device(args.device))
    summary = bfcl.evaluate(model, qwen3_tokenizer(), categories, limit=args.limit,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            results_path=args.results)
    for name, row in summary["categories"].items():
        print(f"{name:24s} {row['accuracy']:7.2%}  ({row['correct']}/{row['total']})")
    print(f"{'overall (unweighted)':24s} {summary['overall_accuracy']:7.2%}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0
