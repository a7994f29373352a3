"""``star-train eval``: its command-line options and what it runs."""

from __future__ import annotations

import json
from pathlib import Path

from ..chat.formats import FORMATS as TOOL_CALL_FORMATS
from ..chat.templates import CHAT_TEMPLATES

TOKENIZERS = ("auto", "qwen3", "model")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder or "
                        "a .gguf file (any causal LM transformers reads)")
    parser.add_argument("--categories", default="all",
                        help="comma-separated BFCL v3 categories, or 'all' (the default): every "
                             "category that runs offline")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per category")
    parser.add_argument("--multi-turn-limit", type=int, default=None,
                        help="first N samples per multi-turn category (default: --limit)")
    parser.add_argument("--chat-template", default="auto", choices=CHAT_TEMPLATES,
                        help="prompt layout: auto (the model's chat template when it handles "
                             "tools and is not Qwen3's, else the Qwen3 layout), qwen3 "
                             "(generation starts inside the think block, as STAR trains), "
                             "qwen3-no-think (Qwen3's enable_thinking=False prompt, for models "
                             "that do not think) or model (the model's own template)")
    parser.add_argument("--tool-format", default="auto", choices=("auto", *TOOL_CALL_FORMATS),
                        help="how calls are written and read: auto (the model template's own "
                             "format, hermes in the Qwen3 layout), hermes (<tool_call> JSON "
                             "blocks) or llama3.1-json")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokenizer", default="auto", choices=TOKENIZERS,
                        help="what encodes the prompts: auto (the model's own when the .gguf "
                             "or folder has one, else the offline Qwen3 tokenizer), qwen3, or "
                             "model")
    parser.add_argument("--results", default=None,
                        help="per-sample results (jsonl); an interrupted run given the same "
                             "file and settings resumes where it stopped")
    parser.add_argument("--out", default=None, help="write the summary (json) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def tokenizer_choice(model: str, choice: str) -> str:
    """``"qwen3"`` or ``"model"``; ``"auto"``: the model's own tokenizer when there is one
    (a .gguf file always holds one), else the offline Qwen3 tokenizer (a Qwen3 saved
    without its tokenizer)."""
    from ..runtime.models import has_own_tokenizer

    if choice != "auto":
        return choice
    return "model" if has_own_tokenizer(model) else "qwen3"


def _load_tokenizer(model: str, choice: str):
    from ..runtime.models import TOKENIZER_FILES, has_own_tokenizer, load_tokenizer

    if choice == "qwen3":
        return load_tokenizer(None)
    if not has_own_tokenizer(model):
        raise FileNotFoundError(f"--tokenizer model: {model} holds none of "
                                f"{', '.join(TOKENIZER_FILES)}")
    return load_tokenizer(model)


def _renderer(tokenizer, args):
    from ..chat.templates import chat_renderer
    from ..runtime.config import ConfigError

    try:
        return chat_renderer(tokenizer, args.tool_format, template=args.chat_template)
    except ValueError as error:  # it names chat_template or tool_format: name the option
        key, _, problem = str(error).partition(":")
        raise ConfigError(f"--{key.replace('_', '-')}:{problem}") from None


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
    from ..runtime import distributed
    from ..runtime.config import ModelSpec
    from ..runtime.models import DTYPES, load_model
    from . import bfcl, runner

    categories = runner.checked_categories(args.categories)  # before the model loads
    for name in ("limit", "multi_turn_limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    # Under torchrun each rank evaluates its share of the samples on its own device
    # (runner.run_bfcl splits and merges); rank 0 prints and writes the files.
    world = distributed.current()
    model = load_model(ModelSpec(path=args.model), DTYPES[args.dtype], world.device(args.device))
    choice = tokenizer_choice(args.model, args.tokenizer)
    tokenizer = _load_tokenizer(args.model, choice)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"--tokenizer {choice}: {len(tokenizer)} tokens, more than the "
                         f"model's vocab_size {model.config.vocab_size} (try --tokenizer model)")
    chat_format = _renderer(tokenizer, args)
    generate_fn = bfcl.hf_generate_fn(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size,
                                      stop_tokens=chat_format.stop_tokens)
    # What the per-sample results depend on (a resumed run must match); batch size and
    # device only change speed. The chat format's name is added by run_bfcl.
    settings = {"model": str(Path(args.model).resolve()), "tokenizer": choice,
                "dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
    summary = runner.run_bfcl(generate_fn, categories, limit=args.limit,
                              multi_turn_limit=args.multi_turn_limit,
                              chat_format=chat_format,
                              results_path=args.results, settings=settings,
                              chunk_size=4 * args.batch_size,
                              progress=not args.no_progress and world.is_main, world=world)
    if not world.is_main:
        return 0
    print("\n".join(report_lines(summary)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0
