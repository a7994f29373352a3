"""star-train prepare-data: the released data preparation on hand-written rows in each
source's schema (xLAM, ToolACE, ToolMind graphsyn, Hammer), the filter_on_simrl step, the
labels and the stratified sample of data_proportion.py, the merge and the command."""

from __future__ import annotations

import json
import math
import random

import pytest

from star_train.data.records import load_records
from star_train.data.sources import categories, convert, label_record, proportion_sample
from star_train.data.sources.converters import sample_rows
from star_train.runtime.config import from_dict
from star_train.stages import prepare_data
from star_train.stages.prepare_data import self_score

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"city": {"description": "City name", "type": "str", "default": ""}}}


def xlam_row(row_id, answers, query="What is the weather in Paris?"):
    return {"id": row_id, "query": query, "answers": json.dumps(answers),
            "tools": json.dumps([WEATHER])}


XLAM = [
    xlam_row(7, [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    xlam_row(8, [{"name": "get_weather", "arguments": {"town": "Paris"}}]),  # undeclared
    xlam_row(9, [{"name": "get_weather", "arguments": {"city": math.nan}}]),  # NaN: 0
    xlam_row(10, [], query="Tell me a joke"),  # no answer: a text reference ("")
]

TOOLACE = [{
    "tools": json.dumps([{"name": "Weather API", "description": "",
                          "parameters": {"city": {"type": "string"}}}]),
    "conversations": json.dumps([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "Weather", "arguments": '{"city": "Paris"}'}}]},   # name repaired
        {"role": "tool", "content": {"temp": 20}},
        {"role": "assistant", "content": "It is 20 degrees."},
        {"role": "user", "content": "And Rome and Oslo?"},
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "Weather API", "arguments": '{"city": "Rome"}'}}]},
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "Weather API", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "user", "content": "Book a flight"},
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "Flights", "arguments": "{}"}}]},                  # no such tool
    ])}, {
    # JSON-schema parameters: the released check reads the spec's own keys, so a call
    # with arguments fails it ("city" is not "type"/"properties").
    "tools": [{"name": "w", "description": "",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "conversations": [{"role": "user", "content": "Paris?"},
                      {"role": "assistant", "tool_calls": [{"function": {
                          "name": "w", "arguments": '{"city": "Paris"}'}}]}]}]

TOOLMIND = [{
    "conversations": [
        {"role": "user", "content": "What's the current time in New York?"},
        {"role": "assistant", "content": "<think>\nneed the time\n</think>\n\n",
         "tool_calls": [{"function": {"name": "get_current_time",
                                      "arguments": {"timezone": "America/New_York"}}}]},
        {"role": "tool", "content": "09:00"},
        {"role": "assistant", "content": "<think>ok</think>It is 9am."}],
    "tools": [{"type": "function", "function": {
                  "name": "get_current_time", "description": "Get the current time",
                  "parameters": {"type": "object", "properties": {
                      "timezone": {"type": "string", "description": "e.g. America/New_York"}}}}},
              {"type": "function", "function": {
                  "name": "grid", "description": "", "arguments": {"radius": {"type": "int"}}}}],
    "source": "graphsyn"}, {
    "conversations": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}],
    "tools": []}]

HAMMER = [{"trace_id": "h1",
           "functions": [{"name": "search", "description": "",
                          "parameters": {"q": {"type": "str", "description": ""}}}],
           "messages": [{"role": "user", "content": "Tell me a joke"}],
           "expected_output": "I cannot help with that using the tools I have."}]


# ------------------------------------------------------------ converters

def test_xlam_rows_by_hand():
    records, problems = convert("xlam", XLAM)
    assert problems == []
    assert records[0] == {"id": "xlam_7", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]}
    assert records[3]["messages"][-1] == {"role": "assistant", "content": None,
                                          "tool_calls": None}
    _, problems = convert("xlam", [{"id": 1, "query": "q", "answers": "[", "tools": "[]"}])
    assert problems and problems[0][0] == "xlam_1"


def test_toolace_turns_by_hand():
    records, problems = convert("toolace", TOOLACE)
    assert [r["id"] for r in records] == ["toolace-0-1", "toolace-0-3", "toolace-0-6"]
    call = {"name": "Weather API", "arguments": {"city": "Paris"}}
    first, text, parallel = records
    assert first["messages"] == [{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "tool_calls": [call]}]
    assert text["messages"][2] == {"role": "tool", "content": '{"temp": 20}'}
    assert text["messages"][-1] == {"role": "assistant", "content": "It is 20 degrees."}
    assert parallel["messages"][-1]["tool_calls"] == [
        {"name": "Weather API", "arguments": {"city": "Rome"}},
        {"name": "Weather API", "arguments": {"city": "Oslo"}}]
    assert len(parallel["messages"]) == 6
    assert [where for where, _ in problems] == ["toolace-0-8", "toolace-1-1"]
    assert "Flights not found" in problems[0][1] and "Argument city" in problems[1][1]


def test_toolmind_rows_by_hand():
    records, problems = convert("toolmind", TOOLMIND)
    assert [where for where, _ in problems] == ["toolmind_1"]   # a system message
    (record,) = records
    assert record["id"] == "toolmind_0" and record["source"] == "graphsyn"
    assert record["messages"][1] == {
        "role": "assistant", "reasoning_content": "\nneed the time\n", "content": "\n\n",
        "tool_calls": [{"name": "get_current_time",
                        "arguments": {"timezone": "America/New_York"}}]}
    assert record["messages"][3] == {"role": "assistant", "reasoning_content": "ok",
                                     "content": "It is 9am.", "tool_calls": None}
    assert [t["name"] for t in record["tools"]] == ["get_current_time", "grid"]
    assert record["tools"][1]["parameters"] == {"radius": {"type": "int"}}
    assert "function" not in record["tools"][0]


def test_hammer_rows_by_hand():
    records, problems = convert("hammer", HAMMER)
    assert problems == []
    assert records == [{"id": "h1", "tools": HAMMER[0]["functions"], "messages": [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "I cannot help with that using the tools I have.",
         "tool_calls": None}]}]


def test_sample_rows_is_format_datas_seeded_sample():
    rows = list(range(100))
    random.seed(42)
    assert sample_rows(rows, 10, 42) == random.sample(rows, 10)
    assert sample_rows(rows, 0, 42) == rows and sample_rows(rows, 200, 42) == rows


# ------------------------------------------------------------ filter_on_simrl

def test_self_scores_by_hand():
    records, _ = convert("xlam", XLAM)
    # exact calls: 1; an undeclared argument: -1; a NaN argument (NaN != NaN): 0;
    # an empty answer: the label reply "<|im_end|>" against itself: 1.
    assert [self_score(r) for r in records] == [1.0, -1.0, 0.0, 1.0]
    assert self_score(convert("hammer", HAMMER)[0][0]) == 1.0
    toolmind, _ = convert("toolmind", TOOLMIND)
    assert self_score({**toolmind[0], "messages": toolmind[0]["messages"][:2]}) == 1.0
    unknown = {**records[0], "tools": [{**WEATHER, "name": "other"}]}
    assert self_score(unknown) == -1.0
    counts = {"simrl_filtered": 0}
    assert prepare_data.filter_on_simrl(records, counts) == [records[0], records[3]]
    assert counts == {"simrl_filtered": 2}


# ------------------------------------------------------------ labels and proportions

def test_labels_by_hand():
    record = label_record(convert("toolmind", TOOLMIND)[0][0])
    first, last = record["messages"][1], record["messages"][3]
    assert (first["tag"], first["turns"], first["tool_call_num"]) == (["response", "single"], 1, 1)
    assert (last["tag"], last["turns"], last["tool_call_num"]) == (["response"], 2, 0)
    multi = label_record({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "a"}, {"name": "b"}]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "c"}]}]})
    assert multi["messages"][1]["tag"] == ["parallel"]
    assert multi["messages"][3]["tag"] == ["single", "multi-step"]
    assert categories(multi) == {"single_turn": False, "multi_turn": True, "parallel": False,
                                 "single": True, "response": False, "multi_step": True}


def _labelled(kind, index, turns=1, prompt="q"):
    calls = {"response": None, "single": [{"name": "f", "arguments": {}}],
             "parallel": [{"name": "f", "arguments": {}}] * 2}[kind]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}] \
        * (turns - 1)
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": "ok" if kind == "response" else None,
                  "tool_calls": calls}]
    return label_record({"id": f"{kind}-{index}", "messages": messages, "tools": []})


def test_proportion_sample_by_hand():
    # size 10: targets single_turn 3, multi_turn 7, parallel 5, single 5, response 2,
    # multi_step 3; greedy stops at 11. Pool: 3 response records (only 2 fit the response
    # target, whichever come first), 3 single-call and 5 two-turn parallel records (each
    # under a target whenever it comes), one parallel record of 11 turns (> max_turns).
    # One parallel record has a prompt over the limit: 9 are left, fewer than 10, so all.
    pool = ([_labelled("response", i) for i in range(3)]
            + [_labelled("single", i) for i in range(3)]
            + [_labelled("parallel", i, turns=2) for i in range(4)]
            + [_labelled("parallel", 4, turns=2, prompt="long " * 200)]
            + [_labelled("parallel", 5, turns=11)])
    report = {}
    chosen = proportion_sample(pool, 10, max_prompt_tokens=300, report=report)
    ids = {r["id"] for r in chosen}
    assert len(chosen) == 9 and report["greedy"] == 10 and report["within_prompt_tokens"] == 9
    assert report["targets"] == {"single_turn": 3, "multi_turn": 7, "parallel": 5,
                                 "single": 5, "response": 2, "multi_step": 3}
    assert sum(i.startswith("response") for i in ids) == 2
    assert {f"single-{i}" for i in range(3)} | {f"parallel-{i}" for i in range(4)} <= ids
    assert "parallel-4" not in ids and "parallel-5" not in ids
    # With more records left than wanted, ``size`` are drawn, seeded.
    again = proportion_sample(pool, 4, max_prompt_tokens=300)
    assert len(again) == 4 and again == proportion_sample(pool, 4, max_prompt_tokens=300)


def test_proportion_sample_follows_the_released_random_calls():
    """The released script seeds the global random once, shuffles, then samples: the
    same calls on one seeded generator give the same records."""
    pool = [_labelled("single", i) for i in range(40)]
    chosen = proportion_sample(pool, 5, single_turns_rate=1.0, parallel_rate=0.0)
    random.seed(42)
    replay = list(pool)
    random.shuffle(replay)
    greedy = replay[:5]   # targets single 5, single_turn 5: the first five are taken
    assert chosen == random.sample(greedy, 5)


# ------------------------------------------------------------ the command

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prepare_data_command_end_to_end(tmp_path, tokenizer):
    from star_train import cli

    paths = {name: _write(tmp_path / f"{name}.jsonl", rows)
             for name, rows in (("xlam", XLAM), ("toolace", TOOLACE),
                                ("toolmind", TOOLMIND), ("hammer", HAMMER))}
    config = tmp_path / "prep.toml"
    config.write_text("".join(f'[{name}]\npath = "{path}"\n' for name, path in paths.items())
                      + '[proportion]\ndataset_size = 10\ntoken_count = "chars"\n'
                        '[output]\nout_dir = "out"\n')
    assert cli.main(["prepare-data", "--config", str(config)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["xlam"]["kept"], summary["xlam"]["simrl_filtered"]) == (2, 2)
    assert summary["toolace"]["kept"] == 3 and summary["hammer"]["kept"] == 1
    assert summary["toolmind"]["kept"] == 1 and summary["toolmind"]["skipped"] == 1
    merged = load_records(out / "merged_messages.jsonl")
    assert [r["id"] for r in merged] == ["toolmind_0", "xlam_7", "xlam_10", "toolace-0-1",
                                         "toolace-0-3", "toolace-0-6", "h1"]
    assert merged[0]["messages"][-1]["tag"] == ["response"]   # labelled, as released
    assert (out / "toolmind_labeled_messages_proportion.jsonl").exists()

    # The tokenizer count (the default) gives the same result on these short prompts.
    cfg = from_dict(prepare_data.PrepareDataConfig, {
        "toolmind": {"path": paths["toolmind"]}, "proportion": {"dataset_size": 10},
        "output": {"out_dir": str(tmp_path / "tok")}})
    summary = prepare_data.run_prepare_data(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert summary["merged"] == 1


def test_config_needs_a_source():
    with pytest.raises(ValueError, match="toolmind.path"):
        from_dict(prepare_data.PrepareDataConfig, {}).validate()
    with pytest.raises(ValueError, match="proportion.token_count"):
        from_dict(prepare_data.PrepareDataConfig, {"proportion": {"token_count": "words"}})
