"""Teacher rollouts: scoring, the keep rule, records the CKD stage can train on, resume."""

import json

import pytest
import torch

from star_train.data.records import build_example, load_records
from star_train.demo import SAMPLE, tiny_qwen3
from star_train.runtime.config import from_dict
from star_train.stages import rollouts, sampling
from star_train.stages.rollouts import answer_message, run_rollouts


def _config(tmp_path, **sampling):
    return from_dict(rollouts.RolloutRunConfig, {
        "data": {"path": str(SAMPLE), "limit": 5},
        "teacher": {"model": tiny_qwen3(32, 1, seed=4)},
        "sampling": {"num_samples": 3, "max_new_tokens": 6, "generate_batch_prompts": 2,
                     **sampling},
        "output": {"out_dir": str(tmp_path / "rollouts"), "shard_size": 2, "dtype": "float32",
                   "device": "cpu"}})


def test_answer_message_from_a_response():
    calls = answer_message('<think>\nlook it up\n</think>\n\n<tool_call>\n{"name": "f", '
                           '"arguments": {"x": 1}}\n</tool_call><|im_end|>')
    assert calls == {"role": "assistant", "content": "", "reasoning_content": "look it up",
                     "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    text = answer_message("<think>\n\n</think>\n\nHello there.")
    assert text == {"role": "assistant", "content": "Hello there.", "reasoning_content": ""}
    with pytest.raises(ValueError, match="response: malformed"):
        answer_message("no think block")


def test_kept_rollout_renders_to_the_teachers_answer():
    """A correct answer, turned into a record, renders back to the same training target."""
    for record in load_records(SAMPLE)[:20]:
        prompt, target = build_example(record)
        response = "<think>\n" + target.removesuffix("\n")
        rebuilt = {**record, "messages": record["messages"][:-1] + [answer_message(response)]}
        assert build_example(rebuilt) == (prompt, target)


def _scripted_teacher(tokenizer, calls):
    """A stand-in for sampling: per prompt, the reference answer, a call to an unknown tool
    and the reference answer again, as token ids ending with <|im_end|>."""
    records = {json.dumps(r["messages"][:-1]): r for r in load_records(SAMPLE)}

    def generate(teacher, prompt_ids, num_samples, *, seed, **kwargs):
        calls.append(seed)
        out = []
        for ids in prompt_ids:
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            record = next(r for key, r in records.items()
                          if build_example(r)[0] == text)
            right = build_example(record)[1].removesuffix("\n")
            wrong = '\n</think>\n\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><|im_end|>'
            out.append([torch.tensor(tokenizer.encode(t, add_special_tokens=False))
                        for t in (right, wrong, right)][:num_samples])
        return out

    return generate


def test_keep_rule_dedupe_and_records(tmp_path, tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "sample_completions", _scripted_teacher(tokenizer, calls))
    cfg = _config(tmp_path)
    summary = run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    seeds = load_records(SAMPLE)[:5]
    assert summary["seed_prompts"] == 5 and summary["samples"] == 15
    assert summary["kept"] == 5  # one of the two identical right answers per prompt
    assert summary["mean_reward"] == pytest.approx((1 + -1 + 1) / 3)
    written = load_records(summary["rollouts"])
    assert [r["id"] for r in written] == [f"{s['id']}/rollout-0" for s in seeds]
    for seed, record in zip(seeds, written):
        assert build_example(record) == build_example(seed)
        assert record["tools"] == seed["tools"]

    no_dedupe = _config(tmp_path / "b", dedupe=False)
    assert run_rollouts(no_dedupe, tokenizer=tokenizer, log=lambda *_: None)["kept"] == 10
    keep_all = _config(tmp_path / "c", min_reward=-1.0)
    assert run_rollouts(keep_all, tokenizer=tokenizer, log=lambda *_: None)["kept"] == 10


def test_interrupted_run_redoes_only_missing_shards(tmp_path, tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "sample_completions", _scripted_teacher(tokenizer, calls))
    cfg = _config(tmp_path)
    run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    out = tmp_path / "rollouts"
    before = (out / "rollouts.jsonl").read_text()
    first_seeds = list(calls)
    assert len(first_seeds) == 3 and len(set(first_seeds)) == 3  # 3 shards, one chunk each
    (out / "shard-00001.jsonl").unlink()  # as if killed while sampling shard 1
    calls.clear()
    run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert calls == [first_seeds[1]]  # only shard 1 sampled again, with its own seed
    assert (out / "rollouts.jsonl").read_text() == before


def test_real_tiny_teacher_end_to_end(tmp_path, tokenizer):
    """A random tiny teacher: the sampling path runs for real; its output is nonsense, so
    the keep rule (reward >= 1) keeps nothing and every sample is counted."""
    summary = run_rollouts(_config(tmp_path), tokenizer=tokenizer, log=lambda *_: None)
    assert summary["samples"] == 15 and summary["kept"] == 0
    assert summary["mean_reward"] == pytest.approx(-1.0)
    assert (tmp_path / "rollouts" / "rollouts.jsonl").read_text() == ""


def test_cli_rollouts(tmp_path, monkeypatch):
    from star_train import cli

    config = tmp_path / "r.toml"
    config.write_text(f'[data]\npath = "{SAMPLE}"\nlimit = 2\n[teacher.model.config]\n'
                      f'hidden_size = 8\n')
    seen = {}
    monkeypatch.setattr(rollouts, "run_rollouts", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["rollouts", "--config", str(config), "--set", "sampling.num_samples=2",
                     "--set", "output.out_dir=o"]) == 0
    cfg = seen["cfg"]
    assert cfg.sampling.num_samples == 2 and cfg.data.limit == 2
    assert cfg.output.out_dir == str(tmp_path / "o")


@pytest.mark.parametrize("section, values, match", [
    ("sampling", {"num_samples": 0}, "sampling.num_samples"),
    ("sampling", {"min_reward": 2.0}, "sampling.min_reward"),
    ("output", {"shard_size": 0}, "output.shard_size"),
    ("output", {"batch": 3}, "batch"),
])
def test_config_errors_name_the_key(section, values, match):
    base = {"data": {"path": "x.jsonl"}, "teacher": {"model": {"path": "t"}}}
    base[section] = values
    with pytest.raises(ValueError, match=match):
        from_dict(rollouts.RolloutRunConfig, base)


def test_killed_between_a_shards_two_files_resumes(tmp_path, tokenizer, monkeypatch):
    """A shard is two files (records, stats). Killed right after the first of them was
    written for shard 1, the next run must still finish with the uninterrupted output."""
    monkeypatch.setattr(sampling, "sample_completions", _scripted_teacher(tokenizer, []))
    straight = run_rollouts(_config(tmp_path / "a"), tokenizer=tokenizer, log=lambda *_: None)

    cfg = _config(tmp_path / "b")
    real = rollouts.write_atomic

    def killed_after_first_file(path, text):
        real(path, text)
        if path.name.startswith("shard-00001"):
            raise KeyboardInterrupt

    monkeypatch.setattr(rollouts, "write_atomic", killed_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    monkeypatch.setattr(rollouts, "write_atomic", real)
    resumed = run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert {k: v for k, v in resumed.items() if k != "rollouts"} == \
        {k: v for k, v in straight.items() if k != "rollouts"}
    assert open(resumed["rollouts"]).read() == open(straight["rollouts"]).read()


def test_keep_everything_skips_completions_that_do_not_parse(tmp_path, tokenizer):
    """min_reward = -1 (allowed: 'keep every rollout') also admits malformed completions
    (reward -1), which cannot become records: they are skipped, not a crash."""
    summary = run_rollouts(_config(tmp_path, min_reward=-1.0), tokenizer=tokenizer,
                           log=lambda *_: None)
    assert summary["samples"] == 15 and summary["kept"] == 0


def test_teacher_weights_are_held_in_the_output_dtype(tmp_path, tokenizer, monkeypatch):
    """output.dtype = bfloat16: the sampling-only teacher is held in bf16 (16 GB for an
    8B teacher), not as fp32 weights (32 GB) cast to bf16 by autocast on every forward."""
    seen = []

    def generate(teacher, prompt_ids, num_samples, **kwargs):
        seen.append({p.dtype for p in teacher.parameters()})
        return [[torch.tensor([tokenizer.convert_tokens_to_ids("<|im_end|>")])] * num_samples
                for _ in prompt_ids]

    monkeypatch.setattr(sampling, "sample_completions", generate)
    cfg = _config(tmp_path)
    cfg.output.dtype = "bfloat16"
    run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)


def test_rerun_with_other_settings_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(sampling, "sample_completions", _scripted_teacher(tokenizer, []))
    run_rollouts(_config(tmp_path), tokenizer=tokenizer, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"sampling.min_reward: 1.0 -> 0.5"):
        run_rollouts(_config(tmp_path, min_reward=0.5), tokenizer=tokenizer, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"shard_size: 2 -> 3"):
        cfg = _config(tmp_path)
        cfg.output.shard_size = 3
        run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
