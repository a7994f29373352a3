"""``star-train eval``: its command-line options and what it runs."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZERS = ("qwen3", "model")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--categories", default="all",
                        help="comma-separated BFCL v3 categories, or 'all' (the default): every "
                             "category that runs offline")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per category")
    parser.add_argument("--multi-turn-limit", type=int, default=None,
                        help="first N samples per multi-turn category (default: --limit)")
    parser.add_argument("--chat-format", default="qwen3", choices=("qwen3", "qwen3-no-think"),
                        help="prompt layout and parser: qwen3 (generation starts inside the "
                             "think block, as STAR trains) or qwen3-no-think (Qwen3's "
                             "enable_thinking=False prompt, for models that do not think)")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokenizer", default="qwen3", choices=TOKENIZERS,
                        help="what encodes the Qwen3-format prompts: the offline Qwen3 "
                             "tokenizer, or the model folder's own (for a non-Qwen model)")
    parser.add_argument("--results", default=None,
                        help="per-sample results (jsonl); an interrupted run given the same "
                             "file and settings resumes where it stopped")
    parser.add_argument("--out", default=None, help="write the summary (json) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load_tokenizer(args):
    if args.tokenizer == "qwen3":
        from ..chat.tokenizer import qwen3_tokenizer
        return qwen3_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(args.model, local_files_only=True)


def _percent(value) -> str:
    return "    n/a" if value is None else f"{value:7.2%}"


def report_lines(summary: dict) -> list[str]:
    """The per-category table, BFCL v3's overall and what it leaves out."""
    lines = []
    for name, row in summary["categories"].items():
        line = f"{name:26s} {_percent(row['accuracy'])}  ({row['correct']}/{row['evaluated']})"
        if row["not_evaluated"]:
            line += f"  + {row['not_evaluated']} not evaluated (need the network)"
        lines.append(line)
    overall = summary["overall"]
    lines.append(f"{'BFCL v3 overall':26s} {_percent(overall['overall'])}  (non-live "
                 f"{overall['non_live']:.2%}, live {overall['live']:.2%}, multi-turn "
                 f"{overall['multi_turn']:.2%}; BFCL leaderboard formula)")
    caveats = []
    if overall["not_evaluated"]:
        listed = ", ".join(f"{c} {n}" for c, n in overall["not_evaluated"].items())
        bounds = overall["bounds"]
        caveats.append(f"not evaluated offline: {listed} samples; a category with none "
                       "evaluated counts 0, as on BFCL's leaderboard; with every "
                       "not-evaluated (or not run) sample wrong/right the overall is "
                       f"{bounds['not_evaluated_wrong']:.2%} / "
                       f"{bounds['not_evaluated_right']:.2%}")
    not_run = [c for c in overall["missing"] if c not in summary["categories"]]
    if not_run:
        caveats.append(f"not run (counted 0): {', '.join(not_run)}")
    limits = {"single-turn": summary["limit"], "multi-turn": summary["multi_turn_limit"]}
    limited = [f"the first {n} sample{'s' * (n != 1)} of each {kind} category"
               for kind, n in limits.items() if n is not None]
    if limited:
        caveats.append(f"{' and '.join(limited)} only: an estimate of a full run, not a "
                       "leaderboard number")
    return lines + [f"  caveat: {caveat}" for caveat in caveats]


def run(args) -> int:
    from ..runtime.config import ModelSpec
    from ..runtime.models import DTYPES, load_model, resolve_device
    from . import bfcl, runner
    from .chat_format import FORMATS

    categories = runner.checked_categories(args.categories)  # before the model loads
    for name in ("limit", "multi_turn_limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    model = load_model(ModelSpec(path=args.model), DTYPES[args.dtype],
                       resolve_device(args.device))
    tokenizer = _load_tokenizer(args)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: {len(tokenizer)} tokens, more than the "
                         f"model's vocab_size {model.config.vocab_size} (try --tokenizer model)")
    generate_fn = bfcl.hf_generate_fn(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size)
    # What the per-sample results depend on (a resumed run must match); batch size and
    # device only change speed.
    settings = {"model": str(Path(args.model).resolve()), "tokenizer": args.tokenizer,
                "dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
    summary = runner.run_bfcl(generate_fn, categories, limit=args.limit,
                              multi_turn_limit=args.multi_turn_limit,
                              chat_format=FORMATS[args.chat_format],
                              results_path=args.results, settings=settings,
                              chunk_size=4 * args.batch_size, progress=not args.no_progress)
    print("\n".join(report_lines(summary)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0
