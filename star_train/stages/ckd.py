"""STAR stage 1: constrained knowledge distillation on one device.

``run_ckd(cfg)`` does the whole stage and can be killed and restarted at any point:
1. tokenizes the records (Qwen3 chat format, prompt masked);
2. builds the teacher top-k cache (resumes shard by shard), then frees the teacher;
3. trains the student with ``star_kernels.fused_linear_ckd_loss`` on its trunk's hidden
   states at the target positions (no ``[tokens x vocab]`` logits), loss = sum over the
   step's target tokens / their number (STAR's masked mean over the whole batch,
   independent of the micro-batch split), AdamW, linear warm-up then constant lr,
   gradient clipping;
4. checkpoints atomically every ``save_every`` steps and resumes from the newest one.
Parameters stay in fp32 (AdamW updates at lr 3e-6 vanish in bf16); ``train.dtype``
bfloat16 runs the forward/backward under autocast.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext

import torch

import star_kernels as sk
from star_kernels.hf import hidden_states

from .checkpoint import (append_log, latest_checkpoint, load_checkpoint, save_checkpoint,
                         truncate_log)
from .config import CKDRunConfig
from .examples import collate, fingerprint, load_examples, target_hidden
from .models import DTYPES, load_model, resolve_device
from .schedule import BatchSchedule
from .stage import (enable_gradient_checkpointing, fused_op_dtype, open_run,
                    optimizer_and_scheduler)
from .teacher_cache import (TeacherCache, build_teacher_cache, cache_is_complete,
                            cache_settings, pin_cache_settings)


def _teacher_name(cfg: CKDRunConfig) -> str:
    spec = cfg.teacher.model
    return spec.path or json.dumps({"config": spec.config, "seed": spec.seed}, sort_keys=True)


def run_ckd(cfg: CKDRunConfig, *, tokenizer=None, on_step_end=None, log=print) -> dict:
    """Run (or resume) the CKD stage; returns a summary. ``on_step_end(step)`` is called
    after each optimizer step (and its checkpoint, if one was due)."""
    cfg.validate()
    from .tokenizer import qwen3_tokenizer

    tokenizer = tokenizer or qwen3_tokenizer()
    device = resolve_device(cfg.train.device)
    compute_dtype = DTYPES[cfg.train.dtype]
    out = open_run(cfg)

    examples = load_examples(cfg.data, tokenizer, log=log)
    digest = fingerprint(examples)
    pad_id = tokenizer.pad_token_id
    log(f"{len(examples)} examples, {sum(e.num_targets for e in examples)} target tokens")

    cache_dir = out / "teacher_cache"
    # A cache built for another teacher, k or data is refused, complete or not.
    pin_cache_settings(cache_dir, cache_settings(
        k=cfg.teacher.k, teacher_name=_teacher_name(cfg), fingerprint=digest,
        num_examples=len(examples), shard_size=cfg.teacher.shard_size))
    if not cache_is_complete(cache_dir):
        t0 = time.perf_counter()
        teacher = load_model(cfg.teacher.model, compute_dtype, device)
        build_teacher_cache(teacher, examples, cache_dir, k=cfg.teacher.k,
                            batch_size=cfg.teacher.batch_size, shard_size=cfg.teacher.shard_size,
                            fingerprint=digest, teacher_name=_teacher_name(cfg), pad_id=pad_id)
        del teacher
        gc.collect()  # HF models can sit in reference cycles: free the teacher now
        log(f"teacher top-{cfg.teacher.k} cache built in {time.perf_counter() - t0:.1f}s")
    cache = TeacherCache(cache_dir, fingerprint=digest)

    student = load_model(cfg.student.model, torch.float32, device)
    if student.config.vocab_size < len(tokenizer):
        raise ValueError(f"student vocab_size {student.config.vocab_size} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens")
    if cfg.student.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    optimizer, scheduler = optimizer_and_scheduler(student, cfg.train)
    schedule = BatchSchedule(len(examples), cfg.train.batch_size, cfg.train.epochs,
                             cfg.train.seed)
    total = schedule.total_steps
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)

    run_key = {"data_fingerprint": digest, "batch_size": cfg.train.batch_size,
               "epochs": cfg.train.epochs, "seed": cfg.train.seed}
    ckpt_root, log_path = out / "checkpoints", out / "train_log.jsonl"
    start = 0
    if (ckpt := latest_checkpoint(ckpt_root)) is not None:
        start = load_checkpoint(ckpt, student, optimizer, scheduler, run=run_key)["step"]
        log(f"resumed from {ckpt} at step {start}")
    truncate_log(log_path, start)

    c = cfg.ckd
    ckd_kwargs = dict(tail_coef=c.tail_coef, student_topm=c.student_topm, kd_ratio=c.kd_ratio,
                      temperature=c.temperature, tail_bucket=c.tail_bucket, reduction="sum")
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if compute_dtype != torch.float32 else nullcontext())
    micro = cfg.train.micro_batch_size
    loss_value = math.nan
    for step in range(start, total):
        t0 = time.perf_counter()
        indices = schedule.batch(step)
        num_tokens = sum(cache.num_targets(i) for i in indices)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for first in range(0, len(indices), micro):
            group = indices[first:first + micro]
            if sum(cache.num_targets(i) for i in group) == 0:
                continue
            batch = collate([examples[i] for i in group], pad_id)
            t_ids, t_logprobs = (torch.cat(parts).to(device)
                                 for parts in zip(*(cache[i] for i in group)))
            with autocast:
                hidden, weight, bias = hidden_states(student, batch["input_ids"].to(device),
                                                     batch["attention_mask"].to(device))
                dtype = fused_op_dtype(hidden)
            # One dtype for the fused op; the casts pass the gradients back to fp32.
            rows = target_hidden(hidden, batch["target_mask"]).to(dtype)
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            labels = None
            if c.kd_ratio < 1.0:
                labels = batch["labels"][:, 1:][batch["target_mask"][:, 1:]].to(device)
            loss = sk.fused_linear_ckd_loss(rows, weight, t_ids, t_logprobs, bias=bias,
                                            labels=labels, **ckd_kwargs)
            (loss / num_tokens).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        done = step + 1
        loss_value = loss_sum / max(num_tokens, 1)
        append_log(log_path, {"step": done, "loss": loss_value, "tokens": num_tokens,
                        "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                        "examples": indices, "seconds": round(time.perf_counter() - t0, 3)})
        if done % cfg.train.log_every == 0 or done == total:
            log(f"step {done}/{total}  ckd loss {loss_value:.4f}  tokens {num_tokens}  "
                f"grad norm {float(grad_norm):.3f}")
        if done % cfg.train.save_every == 0 or done == total:
            save_checkpoint(ckpt_root, done, student, optimizer, scheduler,
                            {"examples_seen": done * cfg.train.batch_size, "run": run_key},
                            keep=cfg.train.keep_checkpoints)
        if on_step_end is not None:
            on_step_end(done)

    final = out / "final"
    student.save_pretrained(final)
    tokenizer.save_pretrained(final)
    log(f"saved the student to {final}")
    return {"steps": total, "start_step": start, "final_loss": loss_value, "model_dir": str(final)}
