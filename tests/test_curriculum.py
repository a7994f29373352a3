"""The whole curriculum chained through its files: teacher rollouts -> CKD -> Sim-RL -> BFCL.

Tiny models, so nothing here measures learning; what it checks is that each stage reads
what the previous one wrote (records, model folders) and runs to the end.
"""

import json

import pytest
import torch

from star_train.chat.tokenizer import qwen3_tokenizer
from star_train.data.records import build_example, load_records
from star_train.demo import SAMPLE, tiny_qwen3
from star_train.eval import bfcl
from star_train.runtime.config import ModelSpec, from_dict
from star_train.runtime.models import load_model
from star_train.stages import sampling
from star_train.stages.ckd import CKDRunConfig, run_ckd
from star_train.stages.rollouts import RolloutRunConfig, run_rollouts
from star_train.stages.simrl import SimRLRunConfig, run_simrl


def _teacher_that_answers_right(tokenizer):
    """Sampling stand-in: every sample is the seed's reference answer (a random tiny
    teacher never produces a valid call, so nothing would reach the CKD stage)."""
    answers = {build_example(r)[0]: build_example(r)[1].removesuffix("\n")
               for r in load_records(SAMPLE)}

    def generate(teacher, prompt_ids, num_samples, **kwargs):
        texts = [answers[tokenizer.decode(ids.tolist(), skip_special_tokens=False)]
                 for ids in prompt_ids]
        return [[torch.tensor(tokenizer.encode(t, add_special_tokens=False))] * num_samples
                for t in texts]

    return generate


def test_rollouts_feed_ckd_feeds_simrl_feeds_eval(tmp_path, monkeypatch):
    tokenizer = qwen3_tokenizer()
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    monkeypatch.setattr(sampling, "sample_completions", _teacher_that_answers_right(tokenizer))
    teacher_spec = tiny_qwen3(48, 1, seed=7)
    made = run_rollouts(from_dict(RolloutRunConfig, {
        "data": {"path": str(SAMPLE), "limit": 6},
        "teacher": {"model": teacher_spec},
        # our prompt (ending "<think>\n", which the scripted teacher keys on) and the
        # exact-answer threshold: what this test's stand-in teacher is built for
        "sampling": {"num_samples": 2, "prompt": "think", "keep": "min_reward"},
        "output": {"out_dir": str(tmp_path / "rollouts"), "dtype": "float32", "device": "cpu"},
    }), **quiet)
    assert made["kept"] == 6  # two identical right answers per prompt, deduplicated

    ckd = run_ckd(from_dict(CKDRunConfig, {
        "data": {"path": made["rollouts"], "max_length": 384},
        "teacher": {"model": teacher_spec, "k": 8},
        "student": {"model": tiny_qwen3(32, 1, seed=8), "gradient_checkpointing": False},
        "ckd": {"student_topm": 8},
        "train": {"out_dir": str(tmp_path / "ckd"), "lr": 1e-3, "batch_size": 2,
                  "micro_batch_size": 2, "dtype": "float32", "device": "cpu"},
    }), **quiet)
    assert ckd["steps"] == 3 and ckd["final_loss"] > 0

    rl = run_simrl(from_dict(SimRLRunConfig, {
        "data": {"path": str(SAMPLE), "limit": 4},
        "policy": {"model": {"path": ckd["model_dir"]}, "gradient_checkpointing": False},
        "rollout": {"num_samples": 2, "prompts_per_rollout": 2, "max_sampling_rounds": 1,
                    "max_new_tokens": 4},
        "train": {"out_dir": str(tmp_path / "simrl"), "max_steps": 1, "dtype": "float32",
                  "device": "cpu"},
    }), **quiet)
    log = [json.loads(line) for line in open(tmp_path / "simrl" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1] and log[0]["groups_sampled"] >= 2

    # a random-ish policy rarely earns a mixed group: without an update there is no final/
    assert rl["updates"] == log[0]["updated"] and (rl["model_dir"] is None) == (not rl["updates"])
    policy_dir = rl["model_dir"] or ckd["model_dir"]
    policy = load_model(ModelSpec(path=policy_dir), torch.float32, torch.device("cpu"))
    result = bfcl.evaluate(policy, tokenizer, ["simple", "irrelevance"], limit=2,
                           max_new_tokens=4, batch_size=2)
    assert {k: v["total"] for k, v in result["categories"].items()} == {"simple": 2,
                                                                        "irrelevance": 2}


def test_curriculum_sft_packed_trains_as_padded(tmp_path, monkeypatch):
    """The curriculum's SFT variant with ``packing``: the same losses, token counts
    and trained weights as right-padded micro-batches (micro-batches of 2 examples of
    different lengths)."""
    from safetensors.torch import load_file

    from benchmarks.curriculum import sft
    from benchmarks.curriculum.sft import SFTConfig, run_sft
    from star_train.runtime.config import TrainConfig
    from train_fixtures import log_lines, weather_records, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", weather_records())
    tokenizer = qwen3_tokenizer()
    built = []  # the batches the stage builds: one row, no mask, when packed
    batch_of = sft.example_batch
    monkeypatch.setattr(sft, "example_batch", lambda *a, **k: built.append(batch_of(*a, **k)) or built[-1])
    logs, finals = [], []
    for name, packing in (("padded", False), ("packed", True)):
        train = TrainConfig(out_dir=str(tmp_path / name), lr=1e-2, micro_batch_size=2,
                            dtype="float32", device="cpu", seed=3, max_steps=3,
                            lr_schedule="constant", warmup_ratio=0.0)
        cfg = SFTConfig(str(data), ModelSpec(**tiny_qwen3(32, 1, seed=8)), train,
                        batch_size=4, epochs=2, max_length=160, packing=packing)
        built.clear()
        run_sft(cfg, tokenizer, log=lambda *_: None)
        assert all((b["input_ids"].shape[0] == 1 and b["attention_mask"] is None) == packing
                   for b in built)
        logs.append(log_lines(tmp_path / name))
        finals.append(load_file(str(tmp_path / name / "final" / "model.safetensors")))
    assert [x["tokens"] for x in logs[0]] == [x["tokens"] for x in logs[1]]
    for x, y in zip(*logs):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    for key, tensor in finals[0].items():
        torch.testing.assert_close(finals[1][key], tensor, rtol=1e-4, atol=1e-6)
