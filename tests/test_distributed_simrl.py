"""Sim-RL (GRPO) under torchrun (gloo, 2 CPU processes) against one process.

The ranks split each sampling round's generate() chunks round-robin (every chunk keeps
its own seed) and gather the scored groups back in chunk order, split the recorded
log-probs' micro-batches likewise, and train every other micro-batch of each step; the
run must log and train what one process does. Both runs go through the real entry point
(``python -m star_train simrl``) with the deterministic fake reward of ``test_simrl``
(a random policy never writes a valid tool call, so the real reward keeps no group): a
subprocess cannot be monkeypatched, so a small launcher script patches
``star_train.stages.sampling.similarity_reward`` (and records the seed of each of its
process's generate() calls, to show the sampling was split rather than repeated) and then
runs the ``star_train`` module as ``-m`` would. The policy is test_simrl's tiny Qwen3
(built from a config, saved with an end-of-turn row that ends completions at varied
lengths).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_simrl
from star_train.runtime import distributed
from star_train.runtime.config import load_config
from star_train.stages import simrl
from train_fixtures import log_lines, weather_records, weights, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
policy_dir = test_simrl.policy_dir  # the tiny Qwen3 whose completions end at varied lengths

LAUNCHER = """\
import atexit
import json
import os
import runpy

from star_train.stages import sampling
from test_simrl import fake_reward

sampling.similarity_reward = fake_reward
seeds = []  # the seeds of this process's generate() calls


def counted(*args, seed, **kwargs):
    seeds.append(seed)
    return sample_completions(*args, seed=seed, **kwargs)


sample_completions, sampling.sample_completions = sampling.sample_completions, counted
atexit.register(lambda: open(os.environ["SEEDS_FILE"] + os.environ.get("RANK", "0"), "w")
                .write(json.dumps(seeds)))
runpy.run_module("star_train", run_name="__main__", alter_sys=True)
"""
TIMING = ("seconds", "tokens_per_s", "world_size")


def _toml_table(name: str, values: dict) -> str:
    return "\n".join([f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]) + "\n"


def _write_config(path: Path, data: Path, policy: str, out: Path, **train) -> Path:
    path.write_text(
        _toml_table("data", {"path": str(data)})
        + _toml_table("policy", {"gradient_checkpointing": False})
        + _toml_table("policy.model", {"path": policy})
        # 3 prompts a round in chunks of 1: 3 generate() calls, 2 on rank 0 and 1 on rank 1
        + _toml_table("rollout", {"num_samples": 4, "prompts_per_rollout": 3,
                                  "max_new_tokens": 10, "generate_batch_prompts": 1,
                                  "max_sampling_rounds": 3})
        + _toml_table("grpo", {"kl_coef": 0.5})
        + _toml_table("train", {"out_dir": str(out), "dtype": "float32", "device": "cpu",
                                "micro_batch_size": 2, "seed": 1, "samples_per_step": 5,
                                "lr": 1e-3, "lr_schedule": "constant", "warmup_ratio": 0.0,
                                "loss_normalization": "micro_batch", "save_every": 100,
                                **train}))
    return path


def _star_train(config: Path, launcher: Path, nproc: int,
                seeds: Path) -> subprocess.CompletedProcess:
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [str(launcher), "simrl", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEDS_FILE": str(seeds),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _same_log(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a = {k: v for k, v in a.items() if k not in TIMING}
        b = {k: v for k, v in b.items() if k not in TIMING}
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)


def test_two_ranks_sample_log_and_train_what_one_process_does(tmp_path, policy_dir):
    data = write_jsonl(tmp_path / "data.jsonl", weather_records())
    launcher = tmp_path / "launch_star_train.py"
    launcher.write_text(LAUNCHER)
    # 3 kept groups x 4 = 12 completions a rollout in steps of 5: 3 steps of 3, 3 and 1
    # micro-batches; step 4 samples the next rollout from the trained policy.
    runs = {}
    for name, nproc in (("single", 1), ("parallel", 2)):
        config = _write_config(tmp_path / f"{name}.toml", data, policy_dir, tmp_path / name,
                               max_steps=4)
        done = _star_train(config, launcher, nproc, tmp_path / f"{name}-seeds-")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = done
    single, parallel = log_lines(tmp_path / "single"), log_lines(tmp_path / "parallel")
    assert [r["world_size"] for r in parallel] == [2] * 4
    assert [r["rollout"] for r in single] == [0, 0, 0, 1] and all(r["updated"] for r in single)
    assert single[0]["sampling_rounds"] == 2  # a refill round: rounds of 3 and 1 chunks
    _same_log(parallel, single)
    final = weights(tmp_path / "single" / "final")
    for name, tensor in weights(tmp_path / "parallel" / "final").items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=1e-5, msg=name)

    # The sampling was split, not repeated: the ranks ran disjoint generate() calls, which
    # together are the single process's.
    ranks = [json.loads(Path(f"{tmp_path}/parallel-seeds-{r}").read_text()) for r in (0, 1)]
    one = json.loads(Path(f"{tmp_path}/single-seeds-0").read_text())
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(one)
    assert runs["parallel"].stdout.count("prompts; skipped") == 1  # rank 0 alone reports


class _TwoRanks(distributed.World):
    """Rank 0 of a world of 2 whose collectives do nothing (no process group needed)."""

    def barrier(self) -> None:
        pass

    def broadcast_parameters(self, module) -> None:
        pass


def test_fsdp2_is_refused_for_the_policy(tmp_path, policy_dir, monkeypatch, tokenizer):
    """The ranks' generate() calls differ in number and length, while FSDP2's all-gathers
    need every rank in every forward: Sim-RL under torchrun trains with ddp only."""
    data = write_jsonl(tmp_path / "data.jsonl", weather_records())
    config = _write_config(tmp_path / "fsdp.toml", data, policy_dir, tmp_path / "fsdp",
                           data_parallel="fsdp2")
    monkeypatch.setattr(distributed, "current", lambda: _TwoRanks(0, 2, 0))
    with pytest.raises(ValueError, match=r"fsdp2 trains a CKD student only, not a policy"):
        simrl.run_simrl(load_config(simrl.SimRLRunConfig, config), tokenizer=tokenizer,
                        log=lambda *_: None)
