"""Supervised fine-tuning (cross-entropy on the answer tokens) in star_train's training skeleton.

The SFT baseline and the teacher's brief fine-tune. It is CKD's stage with the teacher's
top-k replaced by the data's next token: same examples, same seeded batch schedule, same
``Trainer`` (checkpoints, resume, ``final/``), the loss from the fused log-prob op on the
trunk's hidden states (no ``[tokens x vocab]`` logits): ``-sum log p(target)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import star_kernels as sk
from star_train.data.examples import example_batch, fingerprint, load_examples
from star_train.runtime.config import ModelSpec, TrainConfig
from star_train.runtime.models import predicting_rows
from star_train.runtime.run_folder import open_run
from star_train.runtime.schedule import BatchSchedule
from star_train.runtime.trainer import StepPlan, Trainer


@dataclass
class SFTConfig:
    data_path: str
    model: ModelSpec
    train: TrainConfig
    batch_size: int
    epochs: int
    max_length: int
    packing: bool = False  # each micro-batch one padding-free row, as CKD's train.packing

    def validate(self):
        if self.batch_size % self.train.micro_batch_size:
            raise ValueError("batch_size must be a multiple of train.micro_batch_size")
        return self


class SFTStage:
    name = "sft"

    def __init__(self, cfg: SFTConfig, examples, digest: str, pad_id: int, device):
        self.cfg, self.examples, self.pad_id, self.device = cfg, examples, pad_id, device
        self.schedule = BatchSchedule(len(examples), cfg.batch_size, cfg.epochs, cfg.train.seed)
        self.total_steps = self.schedule.total_steps
        self.run_key = {"data_fingerprint": digest, "batch_size": cfg.batch_size,
                        "epochs": cfg.epochs, "seed": cfg.train.seed}

    def plan_step(self, step: int) -> StepPlan:
        indices = self.schedule.batch(step)
        micro = self.cfg.train.micro_batch_size
        groups = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        return StepPlan(groups, sum(self.examples[i].num_targets for i in indices),
                        {"examples": indices})

    def micro_loss(self, model, indices):
        batch = example_batch([self.examples[i] for i in indices], self.pad_id,
                              packed=self.cfg.packing)
        rows, targets, weight, bias = predicting_rows(model, batch, self.device)
        logp = sk.fused_linear_logprobs(rows, weight, targets, bias=bias)
        return -logp.sum(), {}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass  # the schedule is a pure function of the step

    def describe(self, record: dict) -> str:
        return f"sft loss {record['loss']:.4f}  tokens {record['tokens']}"


def run_sft(cfg: SFTConfig, tokenizer, log=print) -> dict:
    cfg.validate()
    out = open_run(cfg.train.out_dir, cfg)
    examples = load_examples(cfg.data_path, tokenizer, max_length=cfg.max_length, log=log)
    digest = fingerprint(examples)
    trainer = Trainer(cfg.train, cfg.model, out, tokenizer=tokenizer,
                      gradient_checkpointing=False, log=log)
    stage = SFTStage(cfg, examples, digest, tokenizer.pad_token_id, trainer.device)
    return trainer.fit(stage)
