"""``python -m benchmarks.curriculum --size cpu``: every step of the experiment, resumable.

Steps (each skipped when its output exists; an interrupted training stage resumes from
its last checkpoint, an interrupted evaluation reruns that one model):

1. prepare: SmolLM2 folder, the cut student, the train / held-out split;
2. teacher = SmolLM2-135M-Instruct after a brief SFT on the train rows;
3. student SFT on the same rows (the baseline); 4. student CKD from the teacher's top-k
   (star_train.stages.ckd); 5. Sim-RL from the CKD student (star_train.stages.simrl);
6. every variant scored on BFCL v3 and the held-out rows (``evaluate``), after each
   training step, so partial results exist while later steps run.

Results: ``benchmarks/results/curriculum-<size>.json`` / ``.md`` / ``.png`` (``report``),
rewritten after every step with what has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from star_train.runtime.config import ModelSpec, TrainConfig
from star_train.runtime.models import load_tokenizer
from star_train.stages.ckd import (
    CKDLossConfig,
    CKDRunConfig,
    CKDTrainConfig,
    DataConfig,
    StudentConfig,
    TeacherConfig,
    run_ckd,
)
from star_train.stages.simrl import (
    GRPOConfig,
    PolicyConfig,
    RolloutConfig,
    SimRLDataConfig,
    SimRLRunConfig,
    SimRLTrainConfig,
    run_simrl,
)

from .evaluate import evaluate_variant
from .prepare import prepare_base, prepare_student, split_rows
from .report import write_report
from .sft import SFTConfig, run_sft
from .sizes import SIZES

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("student-init", "student-sft", "student-ckd", "student-ckd-simrl", "teacher",
            "smollm2-instruct")


def make(cls, **values):
    """``cls(**values)`` without the keys ``cls`` does not have: the stage configs are in
    flux (e.g. Sim-RL's ``prompts_per_step`` became ``prompts_per_rollout``), so both
    spellings are given and the current one is taken."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


class Run:
    def __init__(self, size: str, work: Path, log, results_dir: Path):
        self.size, self.cfg, self.work, self.log = size, SIZES[size], work, log
        self.results_dir = results_dir
        self.timings_path = work / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}

    def timed(self, name: str, fn):
        if name in self.timings:
            return
        began = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - began, 1)
        self.timings_path.write_text(json.dumps(self.timings, indent=1))
        self.log(f"[{name}] done in {self.timings[name]:.0f}s")

    def train_config(self, cls, out: str, section: dict, **extra):
        c = self.cfg
        return make(cls, out_dir=str(self.work / out), lr=section["lr"], weight_decay=0.0, warmup_steps=0,
                    lr_schedule="constant", warmup_ratio=0.0, loss_normalization="step_tokens",
                    micro_batch_size=4, dtype=c["dtype"], device=c["device"], save_every=4,
                    seed=c["seed"], log_every=1, **extra)

    def sft(self, out: str, model_dir: Path, section: dict):
        train = self.train_config(TrainConfig, out, section)
        cfg = SFTConfig(str(self.train_path), ModelSpec(path=str(model_dir)), train,
                        section["batch_size"], section["epochs"], self.cfg["max_length"])
        run_sft(cfg, self.tokenizer, log=self.log)

    def ckd(self):
        c, k = self.cfg, self.cfg["ckd"]
        cfg = CKDRunConfig(
            # The template pair (prompt ending "<think>\n", as the evaluation prompts and the
            # SFT examples do), not the released one (prompt ending "<think>"): a student
            # trained on the released pair never saw the evaluation's prompt ending.
            data=DataConfig(path=str(self.train_path), max_length=c["max_length"], format="template"),
            teacher=TeacherConfig(model=ModelSpec(path=str(self.work / "teacher" / "final")), k=k["k"],
                                  batch_size=4, shard_size=32),
            student=StudentConfig(model=ModelSpec(path=str(self.work / "student-init")),
                                  gradient_checkpointing=False),
            ckd=CKDLossConfig(tail_coef=k["tail_coef"], student_topm=k["student_topm"]),
            train=self.train_config(CKDTrainConfig, "student-ckd", k, batch_size=k["batch_size"],
                                    epochs=k["epochs"]))
        run_ckd(cfg, tokenizer=self.tokenizer, log=self.log)

    def simrl(self):
        c, s = self.cfg, self.cfg["simrl"]
        cfg = SimRLRunConfig(
            data=SimRLDataConfig(path=str(self.train_path), max_prompt_length=c["max_length"]),
            policy=PolicyConfig(model=ModelSpec(path=str(self.work / "student-ckd" / "final")),
                                gradient_checkpointing=False),
            rollout=make(RolloutConfig, num_samples=s["num_samples"], prompts_per_step=s["prompts_per_step"],
                         prompts_per_rollout=s["prompts_per_step"], samples_per_step=0,
                         max_sampling_rounds=s["max_sampling_rounds"],
                         max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                         generate_batch_prompts=s["prompts_per_step"]),
            grpo=GRPOConfig(),
            train=self.train_config(SimRLTrainConfig, "student-ckd-simrl", s, max_steps=s["steps"],
                                    episodes=3))
        run_simrl(cfg, tokenizer=self.tokenizer, log=self.log)

    def evaluate(self, variant: str, model_dir: Path):
        evaluate_variant(variant, str(model_dir), self.heldout_path, self.work / "eval",
                         self.cfg["eval"], self.cfg["device"], log=self.log)

    def simrl_model(self) -> Path:
        """The Sim-RL output; the CKD model itself when no Sim-RL step updated it (every
        sampled group all right or all wrong: dynamic filtering keeps none, and the stage
        writes no final/), which the training log shows (groups_kept 0) and the log says."""
        final = self.work / "student-ckd-simrl" / "final"
        if final.is_dir():
            return final
        self.log("Sim-RL made no update (no group kept): student-ckd-simrl is the CKD model")
        return self.work / "student-ckd" / "final"

    def report(self):
        write_report(self.size, self.cfg, self.work, VARIANTS, self.timings, self.results_dir)

    def run(self, only: set | None = None):
        c, w = self.cfg, self.work
        w.mkdir(parents=True, exist_ok=True)
        base = prepare_base(w / "base", self.log)
        student = prepare_student(base, w / "student-init", c["student_layers"], self.log)
        self.train_path, self.heldout_path = split_rows(w / "data", c["train_rows"], c["heldout_rows"])
        self.tokenizer = load_tokenizer(str(base))
        steps = [
            ("eval student-init", lambda: self.evaluate("student-init", student)),
            ("teacher sft", lambda: self.sft("teacher", base, c["teacher_sft"])),
            ("student sft", lambda: self.sft("student-sft", student, c["student_sft"])),
            ("eval student-sft", lambda: self.evaluate("student-sft", w / "student-sft" / "final")),
            ("student ckd", self.ckd),
            ("eval student-ckd", lambda: self.evaluate("student-ckd", w / "student-ckd" / "final")),
            ("student simrl", self.simrl),
            ("eval student-ckd-simrl", lambda: self.evaluate("student-ckd-simrl", self.simrl_model())),
            ("eval teacher", lambda: self.evaluate("teacher", w / "teacher" / "final")),
            ("eval smollm2-instruct", lambda: self.evaluate("smollm2-instruct", base)),
        ]
        for name, step in steps:
            if (only and name not in only) or name in self.timings:
                continue  # not asked for, or finished (its wall time kept)
            self.log(f"[{name}]")
            self.timed(name, step)
            self.report()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curriculum", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--work", default=None, help="working folder (default runs/curriculum-<size>)")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from what finished")
    args = parser.parse_args(argv)
    work = Path(args.work or ROOT / "runs" / f"curriculum-{args.size}")

    def log(line):
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    run = Run(args.size, work, log, Path(args.results_dir))
    if args.report_only:
        run.report()
    else:
        run.run()
    return 0
