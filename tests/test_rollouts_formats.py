"""Teacher rollouts in another tool-call format: ``teacher.model.tool_format =
"llama3.1-json"`` renders the released prompts with Meta's tool instructions, reads the
teacher's Llama 3.1 JSON calls, keeps them by the released rules and scores them with the
reward (the same scripted teacher as test_rollouts' released test, in that format)."""

import json

import torch

from star_train.chat.formats import LLAMA31_TOOLS_INTRO
from star_train.chat.templates import chat_renderer
from star_train.data.records import build_example, load_records
from star_train.demo import SAMPLE, tiny_qwen3
from star_train.runtime.config import from_dict
from star_train.stages import rollouts, sampling
from star_train.stages.rollouts import released_message, run_rollouts

LLAMA = chat_renderer(fmt="llama3.1-json", template="qwen3")


def _config(tmp_path, **sampling_keys):
    return from_dict(rollouts.RolloutRunConfig, {
        "data": {"path": str(SAMPLE), "limit": 3},
        "teacher": {"model": {**tiny_qwen3(32, 1, seed=4), "tool_format": "llama3.1-json"}},
        "sampling": {"num_samples": 4, "max_new_tokens": 6, "generate_batch_prompts": 2,
                     **sampling_keys},
        "output": {"out_dir": str(tmp_path / "rollouts"), "shard_size": 2, "dtype": "float32",
                   "device": "cpu"}})


def _llama_teacher(tokenizer, prompts_seen):
    """Per prompt: the reference answer, an unknown tool, a valid but wrong answer, the
    reference again; all written as Llama 3.1 JSON after a think block it opens itself."""
    records = {LLAMA.prompt(r["messages"][:-1], r["tools"], open_think=False): r
               for r in load_records(SAMPLE)}

    def generate(teacher, prompt_ids, num_samples, *, seed, **kwargs):
        out = []
        for ids in prompt_ids:
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            prompts_seen.append(text)
            record = records[text]
            calls = record["messages"][-1]["tool_calls"]
            right = "<think>\nok\n</think>\n\n" + "; ".join(
                '{"name": "%s", "parameters": %s}' % (c["name"], json.dumps(c["arguments"]))
                for c in calls) + "<|im_end|>"
            unknown = '<think>\n</think>\n\n{"name": "nope", "parameters": {}}<|im_end|>'
            wrong = ('<think>\nguess\n</think>\n\n{"name": "' + record["tools"][0]["name"]
                     + '", "parameters": {}}<|im_end|>')
            out.append([torch.tensor(tokenizer.encode(t, add_special_tokens=False))
                        for t in (right, unknown, wrong, right)][:num_samples])
        return out

    return generate


def test_rollouts_in_llama31_json(tmp_path, tokenizer, monkeypatch):
    seen = []
    monkeypatch.setattr(sampling, "sample_completions", _llama_teacher(tokenizer, seen))
    seeds = load_records(SAMPLE)[:3]
    assert all(s["messages"][-1].get("tool_calls") for s in seeds)  # the script needs calls
    summary = run_rollouts(_config(tmp_path), tokenizer=tokenizer, log=lambda *_: None)
    for text, seed in zip(seen, seeds):  # Meta's instructions, each tool as indented JSON
        assert LLAMA31_TOOLS_INTRO in text and "<tools>" not in text
        assert json.dumps(seed["tools"][0], indent=4, ensure_ascii=False) in text
        assert text.endswith("<|im_start|>assistant\n")
    assert (summary["samples"], summary["kept"], summary["invalid"], summary["duplicates"]) == (12, 6, 3, 3)
    written = load_records(summary["rollouts"])
    for seed, right, wrong in zip(seeds, written[::2], written[1::2]):
        assert right["messages"][-1]["tool_calls"] == seed["messages"][-1]["tool_calls"]
        assert right["messages"][-1]["reasoning_content"] == "ok"
        assert wrong["messages"][-1]["tool_calls"] == [{"name": seed["tools"][0]["name"], "arguments": {}}]
        # The kept record renders back to the teacher's Llama 3.1 answer.
        calls = "; ".join('{"name": "%s", "parameters": %s}' % (c["name"], json.dumps(c["arguments"]))
                          for c in seed["messages"][-1]["tool_calls"])
        assert build_example(right, LLAMA)[1] == "ok\n</think>\n\n" + calls + "<|im_end|>\n"
    # Rewards (released rules on the parsed calls): the reference answer 1, no arguments 0.
    assert [r["reward"] for r in written] == [1.0, 0.0] * 3


def test_released_message_reads_the_format_by_hand():
    tools = [{"name": "get_weather", "description": "", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    text = 'hm</think>\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}<|im_end|>'
    assert released_message(text, tools, LLAMA) == {
        "role": "assistant", "content": None, "reasoning_content": "hm",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert released_message(text.replace('"city"', '"town"'), tools, LLAMA) is None  # undeclared
    assert released_message(text.replace("}}", "}"), tools, LLAMA) is None          # broken JSON
    reply = released_message("<think>\n</think>\n\nIt is cold.<|im_end|>", tools, LLAMA)
    assert reply == {"role": "assistant", "content": "It is cold.", "tool_calls": None,
                     "reasoning_content": None}
