"""Padding in CKD micro-batches, and the CKD stage's throughput padded vs packed (CPU).

    python -m benchmarks.packing [--data FILE] [--steps 4] [--out benchmarks/results/packing]

Padding fraction: over the batches the CKD stage's seeded schedule forms, the share of
token slots of right-padded micro-batches that hold padding, for several micro-batch
sizes (what packing removes from the trunk's work). Throughput: target tokens per
second of a few CKD steps of a small random Qwen3 student, padded and packed, same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def padding_fraction(lengths: list[int], order: list[int], micro: int) -> float:
    slots = real = 0
    for first in range(0, len(order), micro):
        group = [lengths[i] for i in order[first:first + micro]]
        slots += max(group) * len(group)
        real += sum(group)
    return 1 - real / slots


def main(argv=None) -> int:
    from star_train.chat.tokenizer import qwen3_tokenizer
    from star_train.data.examples import load_examples
    from star_train.demo import SAMPLE, tiny_qwen3
    from star_train.runtime.config import from_dict
    from star_train.runtime.schedule import BatchSchedule
    from star_train.stages.ckd import CKDRunConfig, run_ckd

    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing")
    parser.add_argument("--data", default=str(SAMPLE), help="STAR jsonl (default: the sample)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/packing")
    args = parser.parse_args(argv)
    tokenizer = qwen3_tokenizer()
    examples = load_examples(args.data, tokenizer, fmt="released")
    lengths = [len(ex.input_ids) for ex in examples]
    order = [i for s in range(len(examples) // 128 or 1)
             for i in BatchSchedule(len(examples), min(128, len(examples)), 1, 0).batch(s)]
    fractions = {m: round(padding_fraction(lengths, order, m), 4) for m in (2, 4, 8, 16)}

    timing = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (False, True):
            cfg = from_dict(CKDRunConfig, {
                "data": {"path": args.data, "limit": 64},
                "teacher": {"model": tiny_qwen3(64, 1, 1), "k": 16},
                "student": {"model": tiny_qwen3(256, 4, 2), "gradient_checkpointing": False},
                "ckd": {"student_topm": 16},
                "train": {"out_dir": f"{tmp}/{packing}", "batch_size": 8, "micro_batch_size": 4,
                          "max_steps": args.steps, "dtype": "float32", "device": "cpu",
                          "packing": packing, "save_every": 1000}})
            run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
            lines = [json.loads(x) for x in open(Path(cfg.train.out_dir) / "train_log.jsonl")]
            steady = lines[1:]  # the first step pays one-off costs
            timing["packed" if packing else "padded"] = {
                "target_tokens_per_s": round(sum(x["tokens"] for x in steady)
                                             / sum(x["seconds"] for x in steady), 1),
                "seconds_per_step": round(sum(x["seconds"] for x in steady) / len(steady), 3)}
    command = " ".join(["python -m benchmarks.packing", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads",
              "data": args.data, "examples": len(examples),
              "padding_fraction_by_micro_batch_size": fractions,
              "ckd_stage": {"student": "random Qwen3, hidden 256, 4 layers, V=151,936",
                            "micro_batch_size": 4, "steps_timed": args.steps - 1, **timing}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
