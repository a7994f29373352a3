"""``star-train demo``: the CKD stage end to end on data and models that need no download.

The records are 64 real function-calling rows shipped with the package
(``assets/xlam_sample.jsonl``); the teacher and student are tiny random Qwen3 models
with Qwen3's real vocabulary (the teacher's head is sharpened: a random init is
near-uniform and would teach nothing). Everything the real stage does runs: Qwen3 chat
rendering, tokenization, the teacher top-k cache, fused-loss CKD training, checkpoints.
Success = the full-vocabulary KL(teacher || student) on the response tokens went down.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .chat.tokenizer import QWEN3_VOCAB_SIZE, qwen3_tokenizer
from .runtime.config import ModelSpec, from_dict
from .runtime.models import load_model
from .stages.ckd import CKDRunConfig, load_ckd_examples, run_ckd

SAMPLE = Path(__file__).resolve().parent / "assets" / "xlam_sample.jsonl"


def tiny_qwen3(hidden: int, layers: int, seed: int) -> dict:
    return {"config": {"vocab_size": QWEN3_VOCAB_SIZE, "hidden_size": hidden,
                       "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                       "num_attention_heads": 4, "num_key_value_heads": 2,
                       "head_dim": hidden // 4, "max_position_embeddings": 1024,
                       "tie_word_embeddings": False},
            "seed": seed}


def _make_teacher(directory: Path, seed: int) -> str:
    if not (directory / "config.json").exists():
        teacher = load_model(ModelSpec(**tiny_qwen3(96, 2, seed)), torch.float32,
                             torch.device("cpu"))
        with torch.no_grad():
            teacher.lm_head.weight.mul_(40.0)
        teacher.save_pretrained(directory)
    return str(directory)


@torch.no_grad()
def response_kl(teacher, student, examples) -> float:
    """Mean full-vocabulary KL(teacher || student) over the examples' target tokens."""
    total, count = 0.0, 0
    for ex in examples:
        sel = ex.target_mask[1:]
        ids = ex.input_ids[None].long().to(teacher.device)
        p = teacher(ids).logits[0, :-1][sel].float().log_softmax(-1)
        q = student(ids.to(student.device)).logits[0, :-1][sel].float().log_softmax(-1)
        total += (p.exp() * (p - q)).sum().item()
        count += int(sel.sum())
    return total / max(count, 1)


# What a finished demo leaves for a user to look at; the models, checkpoints and teacher
# cache (about 650 MB with Qwen3's 151,936-row vocabulary) go unless keep_models.
_MODEL_PARTS = ("teacher", "ckd/checkpoints", "ckd/teacher_cache", "ckd/final")


def run(out_dir: str | None = None, steps: int = 0, seed: int = 0, keep_models: bool = False,
        log=print) -> dict:
    """Run the demo in ``out_dir`` (a new temporary folder by default); ``steps`` caps the
    optimizer steps (0 = two epochs over the sample). Afterwards the folder keeps the run's
    config, ``train_log.jsonl`` and (with matplotlib) ``report/``; the models are deleted
    unless ``keep_models``."""
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="star-demo-"))
    cfg = from_dict(CKDRunConfig, {
        "data": {"path": str(SAMPLE)},
        "teacher": {"model": {"path": _make_teacher(out / "teacher", seed)}, "k": 32,
                    "batch_size": 8},
        "student": {"model": tiny_qwen3(64, 2, seed + 1), "gradient_checkpointing": False},
        "ckd": {"student_topm": 32},
        "train": {"out_dir": str(out / "ckd"), "lr": 5e-3, "batch_size": 8,
                  "micro_batch_size": 4, "epochs": 2, "max_steps": steps, "dtype": "float32",
                  "save_every": 8, "log_every": 4, "seed": seed},
    })
    tokenizer = qwen3_tokenizer()
    summary = run_ckd(cfg, tokenizer=tokenizer, log=log)

    device = torch.device("cpu")
    held = load_ckd_examples(cfg, tokenizer)[:8]
    teacher = load_model(cfg.teacher.model, torch.float32, device).eval()
    before = load_model(cfg.student.model, torch.float32, device).eval()
    after = load_model(ModelSpec(path=summary["model_dir"]), torch.float32, device).eval()
    kl_before, kl_after = response_kl(teacher, before, held), response_kl(teacher, after, held)
    log(f"KL(teacher || student) on response tokens: {kl_before:.4f} -> {kl_after:.4f}")
    del teacher, before, after
    if not keep_models:
        for part in _MODEL_PARTS:
            shutil.rmtree(out / part, ignore_errors=True)
    try:
        from .report import write_report

        report = write_report(out / "ckd")
        log(f"run folder: {out / 'ckd'} (train_log.jsonl; plots and summary in {report})")
    except ImportError:
        log(f"run folder: {out / 'ckd'} (train_log.jsonl; pip install matplotlib and run "
            f"star-train report {out / 'ckd'} for plots)")
    if not keep_models:
        log("models, checkpoints and the teacher cache were deleted (--keep-models keeps them)")
    return {**summary, "kl_before": kl_before, "kl_after": kl_after, "out_dir": str(out)}

