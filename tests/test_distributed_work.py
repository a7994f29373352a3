"""Rollouts and eval split over torchrun ranks (gloo, 2 CPU processes) against one process.

Both go through the real entry point (``torchrun ... -m star_train rollouts|eval``). The
rollouts' shards are dealt round-robin and merged by rank 0 in shard order, so
``rollouts.jsonl`` must equal one process's byte for byte; eval deals whole chunks of
samples and all-gathers the scored rows, so the results file (rows and their order) and
the summary must equal one process's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from star_train import cli
from star_train.demo import SAMPLE, tiny_qwen3
from star_train.runtime.config import ModelSpec, load_config
from star_train.runtime.models import load_model
from star_train.stages.rollouts import RolloutRunConfig, run_rollouts

ROOT = Path(__file__).resolve().parents[1]
NEWLINE, OK, THINK_CLOSE, IM_END = 198, 562, 151668, 151645  # Qwen3 token ids


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "star_train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@torch.no_grad()
def _bigram_teacher(folder: Path) -> Path:
    """A tiny Qwen3 whose next token depends on the current token alone, with ties that
    sampling must break: after the prompt's last ``\\n``, ``ok`` or ``</think>``; after
    ``ok``, ``ok`` or ``</think>``; after ``</think>``, ``<|im_end|>``. Its completions
    (``</think>``, ``ok</think>``, ..., or ``okokok...`` cut off unparsed) differ from seed
    to seed, so the kept records show which seeds each shard was sampled with."""
    model = load_model(ModelSpec(**tiny_qwen3(32, 1, seed=5)), torch.float32,
                       torch.device("cpu"))
    for layer in model.model.layers:  # no layer writes to the residual stream
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    head = model.lm_head.weight
    head.zero_()
    normed = model.model.norm(model.model.embed_tokens.weight[[NEWLINE, OK, THINK_CLOSE]])
    direction = dict(zip((NEWLINE, OK, THINK_CLOSE), normed / normed.norm(dim=-1, keepdim=True)))
    for after, choices in ((NEWLINE, (OK, THINK_CLOSE)), (OK, (OK, THINK_CLOSE)),
                           (THINK_CLOSE, (IM_END,))):
        for token in choices:
            head[token] += 8.0 * direction[after]
    model.save_pretrained(folder)
    return folder


def test_two_ranks_write_the_rollouts_of_one_process(tmp_path):
    teacher = _bigram_teacher(tmp_path / "teacher")
    config = tmp_path / "rollouts.toml"
    # 7 seed prompts in shards of 2: rank 0 samples shards 0 and 2, rank 1 shards 1 and 3.
    config.write_text(f'[data]\npath = "{SAMPLE}"\nlimit = 7\n'
                      f'[teacher.model]\npath = "{teacher}"\n'
                      '[sampling]\nnum_samples = 4\nmax_new_tokens = 5\n'
                      'generate_batch_prompts = 1\n'
                      '[output]\nshard_size = 2\ndtype = "float32"\ndevice = "cpu"\nseed = 11\n')
    outs = {name: tmp_path / name for name in ("single", "parallel")}
    one_process = load_config(RolloutRunConfig, config, {"output.out_dir": str(outs["single"])})
    run_rollouts(one_process, log=lambda *_: None)
    _torchrun("rollouts", "--config", str(config), "--set", f"output.out_dir={outs['parallel']}")

    single = (outs["single"] / "rollouts.jsonl").read_text()
    assert (outs["parallel"] / "rollouts.jsonl").read_text() == single
    records = [json.loads(line) for line in single.splitlines()]
    assert len({r["messages"][-1]["reasoning_content"] for r in records}) > 1  # sampled
    assert len({r["id"].split("/")[0] for r in records}) > 4  # from every shard
    summaries = {name: json.loads((out / "summary.json").read_text())
                 for name, out in outs.items()}
    summaries["parallel"]["rollouts"] = summaries["single"]["rollouts"]
    assert summaries["parallel"] == summaries["single"]
    assert summaries["single"]["samples"] == 28 and 0 < summaries["single"]["kept"] < 28
    assert summaries["single"]["invalid"] > 0
    for shard in range(4):  # each shard as one process sampled it, by rank shard % 2
        path = outs["parallel"] / f"shard-{shard:05d}.jsonl"
        assert path.read_text() == (outs["single"] / path.name).read_text()
        assert json.loads(path.with_suffix(".stats.json").read_text())["rank"] == shard % 2

    # A resumed run on another world size skips the shards that exist, whoever made them.
    (outs["parallel"] / "shard-00001.jsonl").unlink()
    (outs["parallel"] / "rollouts.jsonl").unlink()
    resumed = load_config(RolloutRunConfig, config, {"output.out_dir": str(outs["parallel"])})
    run_rollouts(resumed, log=lambda *_: None)
    assert (outs["parallel"] / "rollouts.jsonl").read_text() == single


def test_two_ranks_evaluate_like_one_process(tmp_path, capsys):
    model = load_model(ModelSpec(**tiny_qwen3(32, 1, seed=0)), torch.float32,
                       torch.device("cpu"))
    model.save_pretrained(tmp_path / "model")
    # 5 samples per category in chunks of 4 x --batch-size 1: rank 0 scores the first 4
    # of each category, rank 1 the fifth.
    common = ["eval", "--model", str(tmp_path / "model"), "--categories",
              "simple,irrelevance", "--limit", "5", "--batch-size", "1",
              "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu",
              "--no-progress"]
    runs = {}
    for name in ("single", "parallel"):
        results, summary = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
        files = ["--results", str(results), "--out", str(summary)]
        if name == "single":
            assert cli.main(common + files) == 0
            printed = capsys.readouterr().out
        else:
            printed = _torchrun(*common, *files).stdout
        runs[name] = (results.read_text().splitlines(), json.loads(summary.read_text()), printed)
    (single_rows, single_summary, single_out), (rows, summary, out) = runs.values()
    assert len(single_rows) == 1 + 10
    assert rows == single_rows  # the same rows, in the same order
    assert summary == single_summary
    assert out == single_out and out.count("BFCL v3 overall") == 1  # printed by rank 0 alone

    # Interrupted after 3 rows and inside a 4th: 2 ranks resume it to the same file.
    results = tmp_path / "parallel.jsonl"
    results.write_text("\n".join(rows[:4]) + "\n" + rows[4][:20])
    _torchrun(*common, "--results", str(results))
    assert results.read_text().splitlines() == single_rows


def test_only_the_writer_touches_the_results_file(tmp_path):
    from star_train.eval.results import ResultStore
    from star_train.runtime.distributed import World, in_rounds

    path = tmp_path / "results.jsonl"
    with ResultStore(path, {"a": 1}, writer=False) as store:  # rank 1 before any file
        store.add({"category": "simple", "id": "x"})
    assert not path.exists()
    path.write_text('{"settings": {"a": 1}}\n{"category": "simple", "id": "x"}\n{"cat')
    with ResultStore(path, {"a": 1}, writer=False) as store:
        assert store.get("simple", "x") is not None
        store.add({"category": "simple", "id": "y"})
    assert path.read_text().endswith('{"cat')  # neither repaired nor appended to
    assert list(in_rounds(World(), [1, 2, 3], lambda piece: 10 * piece)) == [(1, 10), (2, 20),
                                                                            (3, 30)]
