"""Command line: ``star-train demo``, ``star-train ckd --config run.toml`` and
``star-train simrl --config run.toml``."""

from __future__ import annotations

import argparse
import json


def _override(text: str) -> tuple[str, object]:
    """``section.key=value``; the value is read as JSON when it parses (numbers, booleans,
    lists), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects section.key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="star-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the CKD stage on packaged sample data with tiny "
                                       "models built from configs (no downloads)")
    demo.add_argument("--steps", type=int, default=0, help="cap on optimizer steps "
                      "(default: two epochs over the sample)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="run folder (default: a new temporary one)")
    stages = {  # command: (help, config loader, runner), imported when chosen
        "rollouts": ("teacher rollouts: sample, score and keep the teacher's answers as CKD "
                     "training records", "load_rollout_config", "rollouts:run_rollouts"),
        "ckd": ("STAR stage 1: teacher top-k cache + CKD training (resumes from the newest "
                "checkpoint in train.out_dir)", "load_config", "ckd:run_ckd"),
        "simrl": ("STAR stage 2: GRPO with the similarity reward (resumes from the newest "
                  "checkpoint in train.out_dir)", "load_simrl_config", "simrl:run_simrl"),
    }
    for name, (help_text, _, _) in stages.items():
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("--config", required=True, help="TOML config (see configs/)")
        stage.add_argument("--set", dest="overrides", type=_override, action="append",
                           default=[], metavar="SECTION.KEY=VALUE",
                           help="override a config value (repeatable)")
    ev = sub.add_parser("eval", help="BFCL v3 single-turn evaluation of a local model "
                                     "(data and AST checker from nvidia-bfcl, offline)")
    ev.add_argument("--model", required=True, help="local Hugging Face model folder")
    ev.add_argument("--categories", default=None,
                    help="comma-separated BFCL categories (default: all supported)")
    ev.add_argument("--limit", type=int, default=None, help="first N samples per category")
    ev.add_argument("--max-new-tokens", type=int, default=2048)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ev.add_argument("--results", default=None, help="write per-sample results (jsonl) here")
    ev.add_argument("--out", default=None, help="write the summary (json) here")
    args = parser.parse_args(argv)
    # Per-file "Loading weights" bars would drown the stages' own progress lines.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if args.command == "demo":
        from .demo import run

        result = run(out_dir=args.out, steps=args.steps, seed=args.seed)
        return 0 if result["kl_after"] < result["kl_before"] else 1
    if args.command in stages:
        import importlib

        from . import config

        _, loader, target = stages[args.command]
        module, runner = target.split(":")
        run = getattr(importlib.import_module(f".{module}", __package__), runner)
        run(getattr(config, loader)(args.config, dict(args.overrides)))
        return 0
    if args.command == "eval":
        return _evaluate(args)
    return 2


def _evaluate(args) -> int:
    from pathlib import Path

    from . import bfcl
    from .config import ModelSpec
    from .models import DTYPES, load_model, resolve_device
    from .tokenizer import qwen3_tokenizer

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


if __name__ == "__main__":
    raise SystemExit(main())
