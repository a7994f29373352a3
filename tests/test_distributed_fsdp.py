"""``train.data_parallel = "fsdp2"`` under torchrun (gloo, 2 CPU processes) against one process.

The student sharded with ``fully_shard`` (each decoder layer, the trunk, an untied lm_head
as its own unit) must train the weights one unsharded process trains on the same global
batch, and its checkpoint (the full, unsharded format) must resume in one process to the
uninterrupted run's weights. Two students in the same torchrun job: an untied one and a
tied one (``tie_word_embeddings``, as Qwen3-0.6B) with gradient checkpointing. Steps of 3
micro-batches over 2 ranks, so one rank pads with a zero-scale repeat in every step.

One torchrun invocation runs this file as a script, which calls the real CLI
(``star_train.cli.main``, what ``-m star_train`` runs) once per config, so the two-process
start-up is paid once. Tolerance: the gradients are reduce-scattered per micro-batch (a
different fp32 summation order from one process's accumulation), rtol 1e-5, atol 1e-6 as
in tests/test_distributed.py.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ABORT = "terminate called without an active exception"
STUDENTS = {"untied": dict(tie=False, checkpointing=False),
            "tied": dict(tie=True, checkpointing=True)}
TIED = {"lm_head.weight": "model.embed_tokens.weight",
        "model.embed_tokens.weight": "lm_head.weight"}


def _failure(out: str, err: str, tmp_path: Path) -> str:
    """What the torchrun job printed (the CLI reports errors on stdout) and how far each
    config got: enough to tell a failed step from a crash at exit."""
    progress = {p.name: sorted(q.name for q in p.rglob("*") if q.is_dir())
                for p in sorted(tmp_path.glob("fsdp-*"))}
    return f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}\nfolders: {progress}"


def _write_config(path: Path, data: Path, out: Path, *, tie: bool, checkpointing: bool,
                  **train) -> Path:
    from test_distributed import _toml_table
    from train_fixtures import tiny_qwen3

    teacher, student = tiny_qwen3(48, 1, 1), tiny_qwen3(32, 2, 2)
    student["config"]["tie_word_embeddings"] = tie
    text = (_toml_table("data", {"path": str(data), "max_length": 160, "format": "template"})
            + _toml_table("teacher", {"k": 8, "batch_size": 2, "shard_size": 4})
            + _toml_table("teacher.model", {"seed": teacher["seed"]})
            + _toml_table("teacher.model.config", teacher["config"])
            + _toml_table("student", {"gradient_checkpointing": checkpointing})
            + _toml_table("student.model", {"seed": student["seed"]})
            + _toml_table("student.model.config", student["config"])
            + _toml_table("ckd", {"student_topm": 8})
            + _toml_table("train", {"out_dir": str(out), "lr": 1e-3, "batch_size": 3,
                                    "micro_batch_size": 1, "dtype": "float32", "device": "cpu",
                                    "save_every": 2, "seed": 3, "lr_schedule": "constant",
                                    "warmup_ratio": 0.0, "weight_decay": 0.01,
                                    # below every step's gradient norm (about 5e-4): clipped
                                    "max_grad_norm": 3e-4, **train}))
    path.write_text(text)
    return path


def test_fsdp2_ranks_train_the_weights_of_one_process_and_resume_in_one(tmp_path, tokenizer):
    from star_train.runtime.config import load_config
    from star_train.stages.ckd import CKDRunConfig, run_ckd
    from train_fixtures import log_lines, weather_records, weights, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", weather_records())
    single, sharded = {}, {}
    for name, student in STUDENTS.items():
        # 7 examples x 2 epochs in batches of 3: 4 steps of 3 micro-batches of 1 example.
        single[name] = _write_config(tmp_path / f"single-{name}.toml", data,
                                     tmp_path / f"single-{name}", epochs=2, **student)
        sharded[name] = _write_config(tmp_path / f"fsdp-{name}.toml", data,
                                      tmp_path / f"fsdp-{name}", epochs=2, **student,
                                      data_parallel="fsdp2")
    # Both ranks run both configs, stopped after step 2 (its checkpoint and final/).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", __file__, *map(str, sharded.values())]
    done = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # the one-process runs meanwhile (the box's cores are shared anyway)
        for name in STUDENTS:
            summary = run_ckd(load_config(CKDRunConfig, single[name]), tokenizer=tokenizer,
                              log=lambda _: None)
            assert summary["steps"] == 4
        out, err = done.communicate(timeout=600)
    finally:
        if done.poll() is None:
            done.kill()
    if done.returncode != 0 and ABORT in err:
        # Known, not understood: under heavy load a gloo rank has (rarely: 3 of ~45 runs on
        # the 2-core machine) aborted this job with std::terminate. One fresh rerun; its
        # results are checked exactly as the first run's would be.
        warnings.warn(f"torchrun job aborted ({ABORT!r}); rerunning it once")
        for name in STUDENTS:
            shutil.rmtree(tmp_path / f"fsdp-{name}", ignore_errors=True)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        out, err = done.stdout, done.stderr
    assert done.returncode == 0, _failure(out, err, tmp_path)

    for name in STUDENTS:
        ours, theirs = tmp_path / f"fsdp-{name}", tmp_path / f"single-{name}"
        parallel_log, single_log = log_lines(ours), log_lines(theirs)
        assert [r["world_size"] for r in parallel_log] == [2, 2]
        assert [r["tokens"] for r in parallel_log] == [r["tokens"] for r in single_log[:2]]
        for mine, reference in zip(parallel_log, single_log):
            assert abs(mine["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"])
            assert abs(mine["grad_norm"] - reference["grad_norm"]) <= 1e-4 * reference["grad_norm"]
        after_two = weights(theirs / "checkpoints" / "step-000002")
        # The files hold the names one process writes (a tied pair stored once, under the
        # name safetensors' save_model keeps in a checkpoint, save_pretrained's in final/).
        assert weights(ours / "final").keys() == weights(theirs / "final").keys()
        assert weights(ours / "checkpoints" / "step-000002").keys() == after_two.keys()
        for folder in (ours / "final", ours / "checkpoints" / "step-000002"):
            for key, tensor in weights(folder).items():
                torch.testing.assert_close(tensor, after_two[TIED.get(key, key)
                                                             if key not in after_two else key],
                                           rtol=1e-5, atol=1e-6, msg=f"{folder}: {key}")
        # The optimizer state is written in the single-process format (indices, full shapes).
        mine_opt = torch.load(ours / "checkpoints" / "step-000002" / "trainer.pt",
                              weights_only=True)["optimizer"]
        their_opt = torch.load(theirs / "checkpoints" / "step-000002" / "trainer.pt",
                               weights_only=True)["optimizer"]
        assert mine_opt["param_groups"] == their_opt["param_groups"]
        for index, entry in their_opt["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(mine_opt["state"][index][key], value, rtol=1e-4,
                                           atol=1e-9, msg=f"optimizer {index} {key}")

    # The sharded checkpoint resumes in one process to the uninterrupted run's weights.
    resumed = run_ckd(load_config(CKDRunConfig, sharded["tied"]), tokenizer=tokenizer,
                      log=lambda _: None)
    assert (resumed["start_step"], resumed["steps"]) == (2, 4)
    final = weights(tmp_path / "single-tied" / "final")
    for key, tensor in weights(tmp_path / "fsdp-tied" / "final").items():
        torch.testing.assert_close(tensor, final[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["world_size"] for r in log_lines(tmp_path / "fsdp-tied")] == [2, 2, 1, 1]


if __name__ == "__main__":  # one torchrun rank: each config through the CLI, 2 steps
    from star_train.cli import main

    for config in sys.argv[1:]:
        code = main(["ckd", "--config", config, "--set", "train.max_steps=2"])
        if code:
            raise SystemExit(code)
