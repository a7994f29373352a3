"""Data parallelism under torchrun (gloo, 2 CPU processes) against one process.

The same global batch on 2 ranks must train the same weights as 1 process: every rank
takes every other micro-batch of the step, the gradients are summed once per step. The
run goes through the real entry point (``torchrun ... -m star_train ckd``), and its
checkpoint must resume in a single process to the weights of an uninterrupted run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from star_train.runtime.config import load_config
from star_train.runtime.distributed import World
from star_train.stages.ckd import CKDRunConfig, run_ckd
from train_fixtures import log_lines, tiny_qwen3, weather_records, weights, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _toml_table(name: str, values: dict) -> str:
    # json.dumps writes strings, numbers and booleans as TOML reads them
    return "\n".join([f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]) + "\n"


def _write_config(path: Path, data: Path, teacher: dict, out: Path, **train) -> Path:
    student = tiny_qwen3(32, 1, 2)
    text = (_toml_table("data", {"path": str(data), "max_length": 160, "format": "template"})
            + _toml_table("teacher", {"k": 8, "batch_size": 2, "shard_size": 2})
            + _toml_table("teacher.model", {"seed": teacher["seed"]})
            + _toml_table("teacher.model.config", teacher["config"])
            + _toml_table("student", {"gradient_checkpointing": False})
            + _toml_table("student.model", {"seed": student["seed"]})
            + _toml_table("student.model.config", student["config"])
            + _toml_table("ckd", {"student_topm": 8})
            + _toml_table("train", {"out_dir": str(out), "lr": 1e-3, "batch_size": 4,
                                    "micro_batch_size": 1, "dtype": "float32", "device": "cpu",
                                    "save_every": 2, "seed": 3, "lr_schedule": "constant",
                                    "warmup_ratio": 0.0, "loss_normalization": "micro_batch",
                                    **train}))
    path.write_text(text)
    return path


def _torchrun(nproc: int, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "star_train", "ckd", "--config", str(config)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_train_the_weights_of_one_process_and_resume_in_one(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", weather_records())
    teacher = tiny_qwen3(48, 1, 1)
    # 7 examples x 2 epochs in batches of 4: 3 steps of 4 micro-batches of 1 example.
    configs = {name: _write_config(tmp_path / f"{name}.toml", data, teacher, tmp_path / name,
                                   epochs=2) for name in ("single", "parallel")}
    single = run_ckd(load_config(CKDRunConfig, configs["single"]), tokenizer=tokenizer,
                     log=lambda _: None)
    assert single["steps"] == 3

    # Two ranks, the same global batch, stopped after step 2 (its checkpoint and final/).
    done = _torchrun(2, configs["parallel"], "train.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    parallel_log, single_log = log_lines(tmp_path / "parallel"), log_lines(tmp_path / "single")
    assert [r["world_size"] for r in parallel_log] == [2, 2]
    assert [r["tokens"] for r in parallel_log] == [r["tokens"] for r in single_log[:2]]
    for ours, theirs in zip(parallel_log, single_log):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    after_two = weights(tmp_path / "single" / "checkpoints" / "step-000002")
    for name, tensor in weights(tmp_path / "parallel" / "final").items():
        torch.testing.assert_close(tensor, after_two[name], rtol=1e-5, atol=1e-6, msg=name)
    # Both ranks built shards of one teacher cache; it holds what one process computed.
    for shard in sorted((tmp_path / "single" / "teacher_cache").glob("shard-*.safetensors")):
        theirs = load_file(str(shard))
        ours = load_file(str(tmp_path / "parallel" / "teacher_cache" / shard.name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5)

    # The 2-rank checkpoint resumes in one process to the uninterrupted run's weights.
    resumed = run_ckd(load_config(CKDRunConfig, configs["parallel"]), tokenizer=tokenizer,
                      log=lambda _: None)
    assert (resumed["start_step"], resumed["steps"]) == (2, 3)
    final = weights(tmp_path / "single" / "final")
    for name, tensor in weights(tmp_path / "parallel" / "final").items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["world_size"] for r in log_lines(tmp_path / "parallel")] == [2, 2, 1]


def test_a_world_of_one_is_the_single_process_path():
    world = World()
    assert (world.enabled, world.is_main, world.share([1, 2, 3])) == (False, True, [1, 2, 3])
    assert world.sum([1.5, 2.0]) == [1.5, 2.0]
    assert World(rank=1, world_size=3).share(list(range(8))) == [1, 4, 7]
    assert World(rank=1, world_size=2, local_rank=1).device("cpu") == torch.device("cpu")
