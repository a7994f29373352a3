"""The star-train command line.

star-train demo                          the CKD stage on packaged data, tiny models
star-train rollouts --config run.toml    teacher rollouts -> CKD training records
star-train ckd --config run.toml         STAR stage 1: teacher top-k cache + CKD
star-train simrl --config run.toml       STAR stage 2: GRPO with the similarity reward
star-train prepare-data --config p.toml  source datasets -> the released Sim-RL data mix
star-train eval --model DIR|FILE.gguf   BFCL v3, offline, any local causal LM
star-train report RUN_DIR                plots and a summary of a training run
star-train config NAME --out FILE        write a shipped preset out for editing

--config takes a TOML file or the name of a shipped preset (star-train config lists them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# command: (help, module under star_train.stages, config class, runner); imported when chosen
STAGES = {
    "rollouts": ("teacher rollouts: sample, score and keep the teacher's answers as CKD "
                 "training records", "rollouts", "RolloutRunConfig", "run_rollouts"),
    "ckd": ("STAR stage 1: teacher top-k cache + CKD training (resumes from the newest "
            "checkpoint in train.out_dir)", "ckd", "CKDRunConfig", "run_ckd"),
    "simrl": ("STAR stage 2: GRPO with the similarity reward (resumes from the newest "
              "checkpoint in train.out_dir)", "simrl", "SimRLRunConfig", "run_simrl"),
    "prepare-data": ("the released Sim-RL data preparation over local files: convert xLAM, "
                     "ToolACE, ToolMind and Hammer rows, filter_on_simrl, ToolMind's "
                     "stratified sample, merge", "prepare_data", "PrepareDataConfig",
                     "run_prepare_data"),
}


def _override(text: str) -> tuple[str, object]:
    """``section.key=value``; the value is read as JSON when it parses (numbers, booleans,
    lists), else kept as a string (a wrong type is then reported by the config check)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects section.key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _parser() -> argparse.ArgumentParser:
    from .eval import command as eval_command

    parser = argparse.ArgumentParser(prog="star-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the CKD stage on packaged sample data with tiny "
                                       "models built from configs (no downloads)")
    demo.add_argument("--steps", type=int, default=0, help="cap on optimizer steps "
                      "(default: two epochs over the sample)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="run folder (default: a new temporary one)")
    demo.add_argument("--keep-models", action="store_true", help="keep the teacher, student, "
                      "checkpoints and teacher cache (about 650 MB) instead of deleting them")
    for name, (help_text, *_) in STAGES.items():
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("--config", required=True, help="a TOML file, or a preset's name "
                           "(star-train config lists them)")
        stage.add_argument("--set", dest="overrides", type=_override, action="append",
                           default=[], metavar="SECTION.KEY=VALUE",
                           help="override a config value (repeatable)")
    eval_command.add_arguments(sub.add_parser(
        "eval", help="BFCL v3 evaluation of a local model, a folder or a .gguf file, in "
                     "its chat format (data and checkers from nvidia-bfcl, offline)"))
    report = sub.add_parser("report", help="plots (PNG) and a markdown summary of a "
                                           "training run, from its train_log.jsonl")
    report.add_argument("run_dir", help="the run's folder (its train.out_dir)")
    config = sub.add_parser("config", help="list the shipped presets, or write one out for "
                                           "editing")
    config.add_argument("name", nargs="?", help="preset to print or write")
    config.add_argument("--out", default=None, help="write it to this file (default: print)")
    return parser


def _preset(args) -> int:
    from .runtime.config import preset_names, preset_path

    if args.name is None:
        print("\n".join(preset_names()))
        return 0
    text = preset_path(args.name).read_text()
    if args.out is None:
        print(text, end="")
        return 0
    from pathlib import Path

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    out.write_text(text)
    print(f"wrote {out}; its relative paths are taken from {out.resolve().parent}")
    return 0


def _run_stage(name: str, args) -> int:
    from .runtime.config import load_config

    _, module, config_class, runner = STAGES[name]
    stage = importlib.import_module(f".stages.{module}", __package__)
    cfg = load_config(getattr(stage, config_class), args.config, dict(args.overrides))
    getattr(stage, runner)(cfg)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Per-file "Loading weights" bars would drown the stages' own progress lines.
    from transformers.utils import logging as hf_logging

    from .runtime.config import ConfigError

    hf_logging.disable_progress_bar()
    try:
        if args.command == "demo":
            from .demo import run

            result = run(out_dir=args.out, steps=args.steps, seed=args.seed,
                         keep_models=args.keep_models)
            return 0 if result["kl_after"] < result["kl_before"] else 1
        if args.command in STAGES:
            return _run_stage(args.command, args)
        if args.command == "config":
            return _preset(args)
        if args.command == "report":
            from .report import write_report

            out = write_report(args.run_dir)
            print(f"wrote {out / 'summary.md'} and its plots")
            return 0
        from .eval import command as eval_command

        return eval_command.run(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ImportError) as error:
        # A user's mistake (a config value, a missing file): one line, no traceback.
        print(f"star-train {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
