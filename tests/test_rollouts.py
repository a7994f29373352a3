"""Teacher rollouts: scoring, the keep rule, records the CKD stage can train on, resume."""

import json

import pytest
import torch

from star_train.chat.qwen3 import render_prompt
from star_train.data.records import build_example, load_records
from star_train.demo import SAMPLE, tiny_qwen3
from star_train.runtime.config import from_dict
from star_train.stages import rollouts, sampling
from star_train.stages.rollouts import answer_message, run_rollouts


def _config(tmp_path, **sampling):
    """The earlier keep rule (reward >= min_reward) on <think>-ended prompts, which most
    tests below exercise; the released defaults have their own tests at the end."""
    return _released_config(tmp_path, **{"prompt": "think", "keep": "min_reward", **sampling})


def _released_config(tmp_path, **sampling):
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
    ("sampling", {"keep": "all"}, "sampling.keep"),
    ("sampling", {"prompt": "chatml"}, "sampling.prompt"),
    ("sampling", {"reward_rules": "loose"}, "sampling.reward_rules"),
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


# ------------------------------------------------------------ the released keep rule

TOOLS = [{"name": "f", "description": "", "parameters": {"type": "object",
                                                         "properties": {"a": {}}}}]


def test_released_message_rules_by_hand():
    message = rollouts.released_message
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert message("<think>\nplan\n</think>\n\n" + call + "<|im_end|>", TOOLS) == {
        "role": "assistant", "content": None, "reasoning_content": "plan",
        "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
    # The released prompt leaves <think> to the teacher; without it one is put in front.
    assert message("plan\n</think>\n\nHello.<|im_end|>", TOOLS) == {
        "role": "assistant", "content": "Hello.", "reasoning_content": "plan",
        "tool_calls": None}
    # Content beside calls is dropped; an empty think is None; wrong values are kept
    # (no correctness filter).
    wrong = '<tool_call>\n{"name": "f", "arguments": {"a": "zzz"}}\n</tool_call>'
    assert message("<think>\n\n</think>\n\nSure.\n" + wrong, TOOLS) == {
        "role": "assistant", "content": None, "reasoning_content": None,
        "tool_calls": [{"name": "f", "arguments": {"a": "zzz"}}]}
    # An unclosed call is not found: kept as released, with neither content nor calls.
    assert message('<think>\nx\n</think>\n\n<tool_call>\n{"name": "f"', TOOLS) == {
        "role": "assistant", "content": None, "reasoning_content": "x", "tool_calls": None}
    # Not format-valid: None.
    for text in ("<think>a</think><think>b</think>hi", "<think>\nno close",
                 "<think>a</think><tool_call>{bad}</tool_call>",
                 '<think>a</think><tool_call>{"name": "g", "arguments": {}}</tool_call>',
                 '<think>a</think><tool_call>{"name": "f", "arguments": {"b": 1}}</tool_call>',
                 '<think>a</think><tool_call>{"name": "f"}</tool_call>'):
        assert message(text, TOOLS) is None, text


def _released_teacher(tokenizer, prompts_seen):
    """Per released-form prompt: the reference answer, an unknown tool, a valid but wrong
    answer and the reference answer again (the teacher opens its own think block)."""
    records = {render_prompt(r["messages"][:-1], r["tools"]): r for r in load_records(SAMPLE)}

    def generate(teacher, prompt_ids, num_samples, *, seed, **kwargs):
        out = []
        for ids in prompt_ids:
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            prompts_seen.append(text)
            record = records[text]
            right = "<think>\n" + build_example(record)[1].removesuffix("\n")
            name = record["tools"][0]["name"]
            unknown = '<think>\n</think>\n\n<tool_call>\n{"name": "nope", "arguments": {}}' \
                      '\n</tool_call><|im_end|>'
            wrong = ('<think>\nguess\n</think>\n\n<tool_call>\n{"name": "' + name
                     + '", "arguments": {}}\n</tool_call><|im_end|>')
            out.append([torch.tensor(tokenizer.encode(t, add_special_tokens=False))
                        for t in (right, unknown, wrong, right)][:num_samples])
        return out

    return generate


def test_released_defaults_keep_valid_deduplicated_answers(tmp_path, tokenizer, monkeypatch):
    seen = []
    monkeypatch.setattr(sampling, "sample_completions", _released_teacher(tokenizer, seen))
    cfg = _released_config(tmp_path, num_samples=4)
    assert (cfg.sampling.keep, cfg.sampling.prompt, cfg.sampling.max_new_tokens) == \
        ("valid", "released", 6)
    summary = run_rollouts(cfg, tokenizer=tokenizer, log=lambda *_: None)
    seeds = load_records(SAMPLE)[:5]
    # The prompt is the released one: generation header, no <think>.
    assert seen == [render_prompt(r["messages"][:-1], r["tools"]) for r in seeds]
    assert all(text.endswith("<|im_start|>assistant\n") for text in seen)
    # Per prompt: right (kept), unknown tool (invalid), wrong but valid (kept), right (dup).
    assert summary["samples"] == 20 and summary["kept"] == 10
    assert (summary["invalid"], summary["duplicates"], summary["prompts_without_rollout"]) == \
        (5, 5, 0)
    written = load_records(summary["rollouts"])
    assert [r["id"] for r in written] == [f"{s['id']}/rollout-{k}" for s in seeds for k in (0, 2)]
    for seed, right, wrong in zip(seeds, written[::2], written[1::2]):
        assert build_example(right) == build_example(seed)   # the teacher's answer, as rendered
        assert wrong["messages"][-1]["reasoning_content"] == "guess"
        assert wrong["messages"][-1]["tool_calls"] == [
            {"name": seed["tools"][0]["name"], "arguments": {}}]
    # The earlier rule, on the same completions: only the exact answer (reward 1) is kept.
    strict = _released_config(tmp_path / "b", num_samples=4, keep="min_reward")
    summary = run_rollouts(strict, tokenizer=tokenizer, log=lambda *_: None)
    assert summary["kept"] == 5 and summary["below_min_reward"] == 10


def test_released_preset_values():
    from star_train.runtime.config import load_config

    cfg = load_config(rollouts.RolloutRunConfig, "rollouts-teacher-8b", {})
    s = cfg.sampling
    assert (s.num_samples, s.temperature, s.max_new_tokens) == (8, 1.0, 2048)
    assert (s.keep, s.prompt, s.reward_rules, s.dedupe) == ("valid", "released", "released", True)
