"""The shipped presets (the released runs) load by name and run a few steps when their
models and data are swapped for the tiny demo ones; every key they set is kept."""

import pytest

from star_train.demo import SAMPLE, tiny_qwen3
from star_train.runtime.config import load_config
from star_train.stages.ckd import CKDRunConfig, run_ckd
from star_train.stages.rollouts import RolloutRunConfig, run_rollouts
from star_train.stages.simrl import SimRLRunConfig, run_simrl
from train_fixtures import log_lines


def _tiny(prefix, hidden, seed):
    spec = tiny_qwen3(hidden, 1, seed)
    return {f"{prefix}.path": "", f"{prefix}.config": spec["config"], f"{prefix}.seed": seed}


def test_ckd_preset_runs_two_steps(tmp_path, tokenizer):
    cfg = load_config(CKDRunConfig, "ckd-qwen3-0.6b", {
        "data.path": str(SAMPLE), "data.limit": 8, "teacher.k": 8, "ckd.student_topm": 8,
        **_tiny("teacher.model", 48, 1), **_tiny("student.model", 32, 2),
        "train.out_dir": str(tmp_path / "ckd"), "train.batch_size": 4, "train.max_steps": 2,
        "train.dtype": "float32", "train.device": "cpu"})
    assert (cfg.data.format, cfg.train.loss_normalization, cfg.train.micro_batch_size) == \
        ("released", "micro_batch", 2)
    summary = run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert summary["steps"] == 2 and [x["step"] for x in log_lines(tmp_path / "ckd")] == [1, 2]


def test_simrl_preset_runs_two_steps(tmp_path, tokenizer):
    cfg = load_config(SimRLRunConfig, "simrl-qwen3-0.6b", {
        "data.path": str(SAMPLE), "data.limit": 6, **_tiny("policy.model", 32, 3),
        "policy.gradient_checkpointing": False,
        "rollout.prompts_per_rollout": 2, "rollout.num_samples": 4, "rollout.max_new_tokens": 6,
        "rollout.max_sampling_rounds": 1, "train.samples_per_step": 4,
        "train.out_dir": str(tmp_path / "rl"), "train.max_steps": 2, "train.dtype": "float32",
        "train.device": "cpu"})
    assert (cfg.rollout.num_samples, cfg.train.lr, cfg.grpo.kl_coef) == (4, 3e-7, 1e-3)
    summary = run_simrl(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert summary["steps"] == 2


def test_rollouts_preset_runs(tmp_path, tokenizer):
    cfg = load_config(RolloutRunConfig, "rollouts-teacher-8b", {
        "data.path": str(SAMPLE), "data.limit": 2, **_tiny("teacher.model", 32, 4),
        "sampling.num_samples": 2, "sampling.max_new_tokens": 4,
        "output.out_dir": str(tmp_path / "ro"), "output.dtype": "float32", "output.device": "cpu"})
    summary = run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert summary["seed_prompts"] == 2 and summary["samples"] == 4


@pytest.mark.parametrize("name", ["ckd-qwen3-0.6b", "simrl-qwen3-0.6b"])
def test_presets_carry_the_released_optimizer(name):
    cls = CKDRunConfig if name.startswith("ckd") else SimRLRunConfig
    cfg = load_config(cls, name)
    assert (cfg.train.adam_betas, cfg.train.lr_schedule, cfg.train.warmup_ratio,
            cfg.train.min_lr_ratio, cfg.train.max_grad_norm) == ([0.9, 0.95], "cosine", 0.03, 0.1, 1.0)
