"""STAR stage 1: constrained knowledge distillation (CKD) on one device.

``run_ckd(cfg)`` does the whole stage and can be killed and restarted at any point:

1. tokenizes the records (Qwen3 chat format, prompt masked; ``data.examples``);
2. builds the teacher top-k cache (``teacher_cache``; resumes shard by shard), then
   frees the teacher;
3. trains the student in the training skeleton (``runtime.trainer``) with
   ``star_kernels.fused_linear_ckd_loss`` on its trunk's hidden states at the target
   positions (no ``[tokens x vocab]`` logits). The batch of step ``s`` is a pure
   function of the seed and ``s`` (``runtime.schedule``); the loss is the sum over the
   step's target tokens / their number (STAR's masked mean over the whole batch,
   independent of the micro-batch split).

The config (TOML sections ``[data]``, ``[teacher]``, ``[student]``, ``[ckd]``,
``[train]``) defaults to STAR's released CKD run.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

import star_kernels as sk

from ..data.examples import FORMATS, MASKS, example_batch, fingerprint, load_examples
from ..data.records import load_records
from ..runtime import distributed
from ..runtime.config import ModelSpec, TrainConfig, enforce, section, setting
from ..runtime.models import (
    DTYPES,
    load_model,
    load_tokenizer,
    model_name,
    model_renderer,
    predicting_rows,
)
from ..runtime.run_folder import open_run
from ..runtime.schedule import BatchSchedule
from ..runtime.trainer import StepPlan, Trainer
from .teacher_cache import TeacherCache, build_teacher_cache, cache_is_complete, cache_settings, pin_cache_settings

# ---------------------------------------------------------------- config

@dataclass
class DataConfig:
    path: str = setting("", path=True)  # STAR messages+tools jsonl
    limit: int = setting(0, min=0)          # use only the first N records (0 = all)
    # released: messages_to_trainset.py's prompt/target and truncation; template: the full
    # Qwen3 rendering (reasoning in a think block), over-long answers skipped
    format: str = setting("released", choices=FORMATS)
    add_reasoning_content: bool = False     # released format: reasoning before </think>
    max_prompt_length: int = setting(5120, min=1)   # released format: longer prompts are cut
    max_response_length: int = setting(512, min=1)  # released format: longer targets are cut
    max_length: int = setting(5632, min=2)  # template format: prompt + response tokens


@dataclass
class TeacherConfig:
    model: ModelSpec = section(ModelSpec)
    k: int = setting(100, min=1)             # teacher top-k per response token
    batch_size: int = setting(8, min=1)      # sequences per teacher forward when caching
    shard_size: int = setting(256, min=1)    # examples per cache shard (the unit of resumption)


@dataclass
class StudentConfig:
    model: ModelSpec = section(ModelSpec)
    gradient_checkpointing: bool = True


@dataclass
class CKDLossConfig:
    tail_coef: float = setting(10.0, min=0)  # lambda on the confident-error mass
    student_topm: int = setting(100, min=1)
    kd_ratio: float = setting(1.0, min=0.0, max=1.0)  # 1 = pure KD (released run)
    temperature: float = setting(1.0, above=0)
    tail_bucket: bool = False
    mask: str = setting("all", choices=MASKS)  # which target tokens: all|think|answer|alter
    kd_type: str = setting("fkl", choices=("fkl", "rkl", "akl"))  # released CKD script: fkl


@dataclass
class CKDTrainConfig(TrainConfig):
    out_dir: str = setting("runs/ckd", path=True)
    lr: float = setting(3e-6, above=0)
    weight_decay: float = setting(1e-4, min=0)
    micro_batch_size: int = setting(2, min=1)  # released; with micro_batch loss normalization
    batch_size: int = setting(128, min=1)    # sequences per optimizer step
    epochs: int = setting(1, min=1)          # max_steps (if set) stops earlier
    packing: bool = False  # each micro-batch as one padding-free row (positions restart)
    # As released, the CKD run walks the RL prompt stream (its on-policy samples unused)
    # and cycles the KD data: steps = RL prompts x samples_per_prompt / batch_size x
    # episodes. Set rl_prompts (a STAR jsonl) to train exactly that many steps; epochs
    # is then ignored and the KD examples cycle, reshuffled on each pass.
    rl_prompts: str = setting("", path=True)
    rl_samples_per_prompt: int = setting(8, min=1)
    rl_episodes: int = setting(1, min=1)


@dataclass
class CKDRunConfig:
    data: DataConfig = section(DataConfig)
    teacher: TeacherConfig = section(TeacherConfig)
    student: StudentConfig = section(StudentConfig)
    ckd: CKDLossConfig = section(CKDLossConfig)
    train: CKDTrainConfig = section(CKDTrainConfig)

    def validate(self) -> "CKDRunConfig":
        enforce(self, [
            (self.data.path, "data.path must name a STAR jsonl file"),
            (not self.ckd.tail_bucket or self.ckd.kd_type == "fkl",
             "ckd.tail_bucket applies to ckd.kd_type = 'fkl' only"),
            (self.train.batch_size % max(1, self.train.micro_batch_size) == 0,
             "train.batch_size must be a multiple of train.micro_batch_size"),
            *self.train.checks(),
        ], {"teacher": self.teacher.model, "student": self.student.model})
        return self


# ---------------------------------------------------------------- the stage

def released_steps(train: CKDTrainConfig) -> int:
    """The released CKD run's length: one step per ``batch_size`` of the RL prompt stream's
    samples (``rl_samples_per_prompt`` per prompt, ``rl_episodes`` passes)."""
    num_prompts = len(load_records(train.rl_prompts))
    return num_prompts * train.rl_samples_per_prompt // train.batch_size * train.rl_episodes


class CKDStage:
    """One optimizer step = the schedule's batch of examples, in micro-batches."""

    name = "ckd"

    def __init__(self, cfg: CKDRunConfig, examples, cache: TeacherCache, digest: str,
                 pad_id: int, device):
        self.cfg, self.examples, self.cache = cfg, examples, cache
        self.pad_id, self.device = pad_id, device
        t = cfg.train
        epochs = t.epochs
        if t.rl_prompts:
            steps = released_steps(t)
            epochs = max(1, -(-steps * t.batch_size // len(examples)))  # enough passes to cycle
        self.schedule = BatchSchedule(len(examples), t.batch_size, epochs, t.seed)
        if t.rl_prompts:
            self.schedule.total_steps = steps
        self.total_steps = self.planned_steps = self.schedule.total_steps
        self.run_key = {"data_fingerprint": digest, "batch_size": t.batch_size,
                        "epochs": epochs, "seed": t.seed, "steps": self.schedule.total_steps}
        c = cfg.ckd
        self.loss_options = dict(
            tail_coef=c.tail_coef, student_topm=c.student_topm, kd_ratio=c.kd_ratio,
            temperature=c.temperature, tail_bucket=c.tail_bucket, kd_type=c.kd_type,
            reduction="sum")
        self._step = 0

    def plan_step(self, step: int) -> StepPlan:
        self._step = step
        indices = self.schedule.batch(step)
        micro = self.cfg.train.micro_batch_size
        groups = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        # A micro-batch without target tokens (every answer masked) adds nothing.
        tokens = [sum(self.cache.num_targets(i) for i in g) for g in groups]
        groups, tokens = [g for g, n in zip(groups, tokens) if n], [n for n in tokens if n]
        return StepPlan(groups, sum(tokens), {"examples": indices}, micro_tokens=tokens)

    def micro_loss(self, model, indices):
        batch = example_batch([self.examples[i] for i in indices], self.pad_id,
                              packed=self.cfg.train.packing)
        t_ids, t_logprobs = (torch.cat(parts).to(self.device)
                             for parts in zip(*(self.cache[i] for i in indices)))
        rows, targets, weight, bias = predicting_rows(model, batch, self.device)
        labels = targets if self.cfg.ckd.kd_ratio < 1.0 else None
        loss = sk.fused_linear_ckd_loss(rows, weight, t_ids, t_logprobs, bias=bias,
                                        labels=labels, **self.loss_options)
        return loss, {}

    def state(self) -> dict:
        return {"examples_seen": (self._step + 1) * self.cfg.train.batch_size}

    def restore(self, state: dict) -> None:
        pass  # the schedule is a pure function of the step

    def describe(self, record: dict) -> str:
        return (f"ckd loss {record['loss']:.4f}  tokens {record['tokens']}  "
                f"grad norm {record['grad_norm']:.3f}")


def prepare_teacher_cache(cfg: CKDRunConfig, examples, digest: str, out, pad_id: int,
                          log) -> TeacherCache:
    """The teacher's top-k for every target token, built once (resumable) and then read."""
    cache_dir = out / "teacher_cache"
    settings = cache_settings(k=cfg.teacher.k, teacher_name=model_name(cfg.teacher.model),
                              fingerprint=digest, num_examples=len(examples),
                              shard_size=cfg.teacher.shard_size)
    pin_cache_settings(cache_dir, settings)  # a cache for another teacher, k or data: refused
    world = distributed.current()
    world.barrier()  # every rank sees the same shards on disk when deciding to build
    if not cache_is_complete(cache_dir):
        t0 = time.perf_counter()
        teacher = load_model(cfg.teacher.model, DTYPES[cfg.train.dtype],
                             world.device(cfg.train.device))
        build_teacher_cache(teacher, examples, cache_dir, k=cfg.teacher.k,
                            batch_size=cfg.teacher.batch_size, shard_size=cfg.teacher.shard_size,
                            fingerprint=digest, teacher_name=settings["teacher"], pad_id=pad_id)
        del teacher
        gc.collect()  # HF models can sit in reference cycles: free the teacher now
        log(f"teacher top-{cfg.teacher.k} cache built in {time.perf_counter() - t0:.1f}s")
    return TeacherCache(cache_dir, fingerprint=digest)


def load_ckd_examples(cfg: CKDRunConfig, tokenizer, log=None) -> list:
    """The tokenized examples a CKD config trains on, rendered in the student's chat
    format (``student.model``'s ``chat_template`` and ``tool_format``; the teacher reads
    the same tokens)."""
    d = cfg.data
    renderer = model_renderer(cfg.student.model, tokenizer, "student.model")
    return load_examples(d.path, tokenizer, max_length=d.max_length, limit=d.limit,
                         fmt=d.format, mask=cfg.ckd.mask, add_reasoning=d.add_reasoning_content,
                         max_prompt_length=d.max_prompt_length,
                         max_response_length=d.max_response_length, log=log,
                         renderer=renderer)


def run_ckd(cfg: CKDRunConfig, *, tokenizer=None, on_step_end=None, log=print) -> dict:
    """Run (or resume) the CKD stage; returns a summary. ``on_step_end(step, report)`` is
    called after each optimizer step (and its checkpoint, if one was due)."""
    cfg.validate()
    log = distributed.main_only_log(log, distributed.current())
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.student.model)
    out = open_run(cfg.train.out_dir, cfg)
    examples = load_ckd_examples(cfg, tokenizer, log)
    digest = fingerprint(examples)
    log(f"{len(examples)} examples, {sum(e.num_targets for e in examples)} target tokens")
    cache = prepare_teacher_cache(cfg, examples, digest, out, tokenizer.pad_token_id, log)

    trainer = Trainer(cfg.train, cfg.student.model, out, tokenizer=tokenizer,
                      gradient_checkpointing=cfg.student.gradient_checkpointing, log=log)
    stage = CKDStage(cfg, examples, cache, digest, tokenizer.pad_token_id, trainer.device)
    return trainer.fit(stage, on_step_end)
