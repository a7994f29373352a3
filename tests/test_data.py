"""STAR records loader and Qwen3 renderer, checked byte for byte against the real Qwen3 template
rendered by transformers' own chat-template machinery (the ground truth apply_chat_template uses)."""
import copy
import json
from pathlib import Path

import pytest

from star_train.chat.qwen3 import render_chat, render_prompt
from star_train.data.records import build_example, load_records, validate_record

# CI clones the repo beside a copy of shared/, so shared/data sits two levels above this file.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data folder missing: {DATA_DIR}")


@pytest.fixture(scope="module")
def reference():
    """render(messages, tools, **template_kwargs) through transformers' render_jinja_template."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (DATA_DIR / "qwen3_chat_template.jinja").read_text(encoding="utf-8")

    def render(messages, tools=None, tool_style="bare", **template_kwargs):
        # apply_chat_template drops None-valued keys before rendering; do the same.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        qwen_tools = tools or None
        if tools and tool_style == "openai":
            qwen_tools = [{"type": "function", "function": tool} for tool in tools]
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[messages], tools=qwen_tools, chat_template=template, **template_kwargs)
        return rendered[0]

    return render


# ---------------------------------------------------------------- the 1024 real rows

@needs_data
def test_every_example_row_matches_the_template(reference):
    records = load_records(DATA_DIR / "star_example_messages.jsonl")
    assert len(records) == 1024
    for record in records:
        messages, tools = record["messages"], record["tools"]
        prompt, target = build_example(record)
        assert prompt + target == reference(messages, tools), record["id"]
        assert prompt == reference(messages[:-1], tools, add_generation_prompt=True) + "<think>\n", record["id"]
        assert target.endswith("</tool_call><|im_end|>\n"), record["id"]


# ---------------------------------------------------------------- synthetic conversations

WEATHER_SCHEMA_TOOL = {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}
FLAT_TOOL = {  # xLAM-style flat specs, including a parameter that is itself called "type"
    "name": "convertir_devise", "description": "Convertit un montant — 汇率 € → ¥.",
    "parameters": {"amount": {"type": "float", "description": "Montant à convertir"},
                   "type": {"type": "str", "description": "Type de taux, e.g. 'spot'", "default": "spot"}}}
NO_PARAMETER_TOOL = {"name": "now", "parameters": {"type": "dict", "properties": {}}}


def call(name, arguments):
    return {"name": name, "arguments": arguments}


CONVERSATIONS = {
    "system_multiturn_parallel_tools": (
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Weather in Paris and Lyon?"},
         {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.",
          "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Lyon", "days": 2})]},
         {"role": "tool", "content": '{"temp": 21}'},
         {"role": "tool", "content": '{"temp": 19}'},
         {"role": "tool", "content": "extra note"},
         {"role": "assistant", "content": "Paris 21, Lyon 19.", "reasoning_content": "Summarize."},
         {"role": "user", "content": "And what time is it?"},
         {"role": "assistant", "content": "\n\nChecking.", "tool_calls": [call("now", {})]}],
        [WEATHER_SCHEMA_TOOL, NO_PARAMETER_TOOL]),
    "no_tools_text_reply_without_reasoning": (
        [{"role": "system", "content": "Be kind."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! How can I help?"}],
        []),
    "flat_schema_non_ascii_string_arguments": (
        [{"role": "user", "content": "Convertis 10 € en ¥ 😀, s'il te plaît."},
         {"role": "assistant", "content": "",
          "tool_calls": [call("convertir_devise", '{"amount":10,"type":"spot","note":"déjà"}')]}],
        [FLAT_TOOL]),
    "reasoning_inlined_in_content": (
        [{"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
         {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "<think>\n\n</think>\n\nusing a tool", "tool_calls": [call("now", {})]},
         {"role": "tool", "content": "6"},
         {"role": "assistant", "content": "<think>\nagain\n\n</think>\n\n6"}],
        None),
    "empty_reasoning_and_reasoning_before_last_query": (
        [{"role": "user", "content": "first"},
         {"role": "assistant", "content": "old", "reasoning_content": "dropped: before the last query"},
         {"role": "user", "content": "second"},
         {"role": "assistant", "content": "", "reasoning_content": "",
          "tool_calls": [call("get_weather", {"city": "Oslo"})]},
         {"role": "tool", "content": "cold"},
         {"role": "assistant", "content": "Cold.", "reasoning_content": "\nkept: after the last query\n"}],
        [WEATHER_SCHEMA_TOOL]),
    "wrapped_tool_response_user_turn_and_late_system": (
        [{"role": "user", "content": "Look it up."},
         {"role": "assistant", "content": "Calling.", "reasoning_content": "call it",
          "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
         {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"},
         {"role": "system", "content": "Answer in one word."},
         {"role": "assistant", "content": "Sunny.", "reasoning_content": "It said sunny."}],
        [WEATHER_SCHEMA_TOOL]),
}


@needs_data
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_renderer_matches_template_on_raw_messages(reference, name):
    messages, tools = CONVERSATIONS[name]
    assert render_chat(messages, tools) == reference(messages, tools)
    for end in range(1, len(messages) + 1):  # every prefix, as a generation prompt
        assert render_prompt(messages[:end], tools) == reference(messages[:end], tools, add_generation_prompt=True)
    no_think = reference(messages[:-1], tools, add_generation_prompt=True, enable_thinking=False)
    assert render_prompt(messages[:-1], tools, enable_thinking=False) == no_think
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@needs_data
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_training_pair_splits_the_full_rendering(reference, name):
    messages, tools = CONVERSATIONS[name]
    record = validate_record({"id": name, "messages": messages, "tools": tools})
    prompt, target = build_example(record)
    assert prompt + target == reference(record["messages"], record["tools"])
    assert prompt == reference(record["messages"][:-1], record["tools"], add_generation_prompt=True) + "<think>\n"
    assert target.endswith("<|im_end|>\n") and "<|im_start|>" not in target


def test_target_holds_reasoning_then_calls_with_decoded_arguments():
    record = {"id": "r1", "tools": [FLAT_TOOL], "messages": [
        {"role": "user", "content": "convert"},
        {"role": "assistant", "content": None, "reasoning_content": "Need conversion.",
         "tool_calls": [call("convertir_devise", '{"amount":10,"type":"spot"}')]}]}
    prompt, target = build_example(record)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert target == ('Need conversion.\n</think>\n\n<tool_call>\n{"name": "convertir_devise", '
                      '"arguments": {"amount": 10, "type": "spot"}}\n</tool_call><|im_end|>\n')


def test_tools_are_printed_bare_as_released_by_default():
    prompt = render_prompt([{"role": "user", "content": "x"}], [FLAT_TOOL, WEATHER_SCHEMA_TOOL])
    tool_lines = prompt.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in tool_lines] == [FLAT_TOOL, WEATHER_SCHEMA_TOOL]


@needs_data
def test_openai_tool_style_matches_the_template_given_wrapped_tools(reference):
    records = load_records(DATA_DIR / "star_example_messages.jsonl")[:50]
    for record in records:
        messages, tools = record["messages"], record["tools"]
        assert render_chat(messages, tools, tool_style="openai") == \
            reference(messages, tools, tool_style="openai"), record["id"]


def test_tools_are_printed_as_given_in_the_openai_wrapper():
    prompt = render_prompt([{"role": "user", "content": "x"}], [FLAT_TOOL, WEATHER_SCHEMA_TOOL],
                           tool_style="openai")
    tool_lines = prompt.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in tool_lines] == [
        {"type": "function", "function": FLAT_TOOL}, {"type": "function", "function": WEATHER_SCHEMA_TOOL}]
    assert tool_lines[0].startswith('{"type": "function", "function": {"name": "convertir_devise", "description"')
    assert "汇率 € → ¥" in tool_lines[0]  # not ASCII-escaped, keys in their given order


def test_null_assistant_content_renders_as_empty():
    with_null = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": None, "tool_calls": [call("f", {})]}]
    with_empty = [with_null[0], {**with_null[1], "content": ""}]
    assert render_chat(with_null) == render_chat(with_empty)
    assert validate_record({"id": 1, "messages": with_null})["messages"][1]["content"] == ""


# ---------------------------------------------------------------- loading and bad input

def valid_record():
    return {"id": "ok-1", "tools": [copy.deepcopy(WEATHER_SCHEMA_TOOL), copy.deepcopy(FLAT_TOOL)], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": None,
         "tool_calls": [call("get_weather", {"city": "Paris"})]}]}


def test_validation_keeps_tools_and_input_untouched():
    record = valid_record()
    record["messages"][1]["tool_calls"][0]["arguments"] = '{"city": "Paris"}'
    before = copy.deepcopy(record)
    checked = validate_record(record)
    assert record == before
    assert checked["tools"] == before["tools"]
    assert checked["messages"][1]["tool_calls"][0]["arguments"] == {"city": "Paris"}


def set_path(path, value):
    def mutate(record):
        *parents, last = path
        target = record
        for key in parents:
            target = target[key]
        target[last] = value
    return mutate


def delete_path(path):
    def mutate(record):
        *parents, last = path
        target = record
        for key in parents:
            target = target[key]
        del target[last]
    return mutate


CALL = ("messages", 1, "tool_calls", 0)
BAD_RECORDS = {
    "no id": (delete_path(("id",)), "id"),
    "messages empty": (set_path(("messages",), []), "messages"),
    "messages not a list": (set_path(("messages",), {"role": "user"}), "messages"),
    "last message not assistant": (lambda r: r["messages"].append({"role": "user", "content": "?"}),
                                   "messages[2].role"),
    "unknown role": (set_path(("messages", 0, "role"), "bot"), "messages[0].role"),
    "user content not a string": (set_path(("messages", 0, "content"), ["Weather?"]), "messages[0].content"),
    "no user query": (set_path(("messages", 0, "role"), "system"), "messages"),
    "reasoning not a string": (set_path(("messages", 1, "reasoning_content"), 3), "messages[1].reasoning_content"),
    "tool_calls not a list": (set_path(("messages", 1, "tool_calls"), {"name": "x"}), "messages[1].tool_calls"),
    "call without name": (delete_path(CALL + ("name",)), "messages[1].tool_calls[0].name"),
    "call without arguments": (delete_path(CALL + ("arguments",)), "messages[1].tool_calls[0].arguments"),
    "arguments a list": (set_path(CALL + ("arguments",), ["Paris"]), "messages[1].tool_calls[0].arguments"),
    "arguments bad JSON": (set_path(CALL + ("arguments",), "{city: Paris}"), "messages[1].tool_calls[0].arguments"),
    "arguments JSON of a list": (set_path(CALL + ("arguments",), '["Paris"]'), "messages[1].tool_calls[0].arguments"),
    "tools not a list": (set_path(("tools",), {"name": "get_weather"}), "tools"),
    "tool without name": (delete_path(("tools", 0, "name")), "tools[0].name"),
    "description not a string": (set_path(("tools", 0, "description"), ["x"]), "tools[0].description"),
    "tool without parameters": (delete_path(("tools", 1, "parameters")), "tools[1].parameters"),
    "parameters not an object": (set_path(("tools", 0, "parameters"), "city"), "tools[0].parameters"),
    "schema type not object": (set_path(("tools", 0, "parameters", "type"), "array"), "tools[0].parameters.type"),
    "properties not an object": (set_path(("tools", 0, "parameters", "properties"), ["city"]),
                                 "tools[0].parameters.properties"),
    "required not a list": (set_path(("tools", 0, "parameters", "required"), "city"), "tools[0].parameters.required"),
    "flat spec not an object": (set_path(("tools", 1, "parameters", "amount"), "float"), "tools[1].parameters.amount"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_malformed_record_names_the_field(case):
    mutate, field = BAD_RECORDS[case]
    record = valid_record()
    mutate(record)
    with pytest.raises(ValueError) as raised:
        validate_record(record, line_number=7)
    message = str(raised.value)
    assert f"{field}:" in message
    assert ("'ok-1'" in message or case == "no id") and "line 7" in message


def test_load_records_reads_jsonl_and_names_bad_lines(tmp_path):
    good = valid_record()
    good["messages"][1]["tool_calls"][0]["arguments"] = '{"city": "Paris"}'
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n\n" + json.dumps({**good, "id": "ok-2"}) + "\n",
                    encoding="utf-8")
    records = load_records(path)
    assert [record["id"] for record in records] == ["ok-1", "ok-2"]
    assert records[0]["messages"][1]["tool_calls"][0]["arguments"] == {"city": "Paris"}

    path.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_records(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: id:"):
        load_records(path)


def test_build_example_rejects_a_conversation_it_cannot_split():
    with pytest.raises(ValueError, match=r"'s1'.*messages: no user query"):
        build_example({"id": "s1", "messages": [{"role": "system", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]})
