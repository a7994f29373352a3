"""Tool-call formats (star_train.chat.formats) and chat rendering (star_train.chat.templates).

Hermes must be exactly the Qwen3 renderer and parser (the default stays byte-identical);
Llama 3.1 JSON is checked against literal text written out from Meta's template
('{"name": "' + name + '", "parameters": ' + arguments|tojson + '}') and vLLM's
llama3_json convention for parallel calls ('; '-separated).
"""

import json
from pathlib import Path

import pytest

from star_train.chat import qwen3
from star_train.chat.formats import FORMATS, HERMES, LLAMA31_JSON, LLAMA31_TOOLS_INTRO, get_format
from star_train.chat.templates import chat_renderer, template_format, template_handles_tools
from star_train.data.records import build_example, load_records
from star_train.reward import similarity_reward

ASSETS = Path(__file__).resolve().parents[1] / "star_train" / "assets" / "xlam_sample.jsonl"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "days": {"type": "integer"}}}}


@pytest.fixture(scope="module")
def records():
    return load_records(ASSETS)


# ---------------------------------------------------------------- Hermes = Qwen3

HERMES_CASES = [
    "<think>\nok\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call><|im_end|>",
    "<think>\n</think>\n\nIt is sunny.",
    "<think>\n</think>\n\n<tool_call>{\"name\": \"f\"}</tool_call>",
    "no think block at all",
    "<think></think><tool_call>\n{\"name\": \"f\", \"arguments\": {}}",
    "<think>a</think><tool_call>{\"name\": \"f\", \"arguments\": {\"a\": NaN}}</tool_call>",
]


@pytest.mark.parametrize("text", HERMES_CASES)
def test_hermes_parses_exactly_as_the_qwen3_parser(text):
    assert HERMES.parse_response(text) == qwen3.parse_response(text)


def test_hermes_rendering_is_byte_identical_to_the_default(records):
    renderer = chat_renderer()  # no tokenizer: the Qwen3 layout with Hermes calls
    assert renderer.layout == "qwen3-layout" and renderer.fmt is HERMES
    for record in records:
        assert renderer.example(record) == build_example(record)
        assert build_example(record, fmt="hermes") == build_example(record)


# ---------------------------------------------------------------- Llama 3.1 JSON

def test_llama31_renders_metas_call_text():
    calls = [{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}]
    assert LLAMA31_JSON.render_calls(calls) == '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}'
    two = calls + [{"function": {"name": "now", "arguments": "{}"}}]
    assert LLAMA31_JSON.render_calls(two) == ('{"name": "get_weather", "parameters": {"city": "Zürich", '
                                              '"days": 2}}; {"name": "now", "parameters": {}}')


@pytest.mark.parametrize("body, calls", [
    ('{"name": "f", "parameters": {"a": 1}}', [{"name": "f", "arguments": {"a": 1}}]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}<|eom_id|>', [{"name": "f", "arguments": {"a": 1}}]),
    ('{"name": "f", "arguments": {}}<|eot_id|>', [{"name": "f", "arguments": {}}]),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": "x;y"}}',
     [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": "x;y"}}]),
    ('{"name": "f", "parameters": {}}\n{"name": "g", "parameters": {}}',
     [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]),
    ('[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {}}]',
     [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]),
])
def test_llama31_parses_calls(body, calls):
    parsed = LLAMA31_JSON.parse_response("<think>\nhm\n</think>\n\n" + body)
    assert parsed.error is None and parsed.tool_calls == calls and parsed.reasoning == "hm"
    no_think = LLAMA31_JSON.parse_response(body, think=False)
    assert no_think.error is None and no_think.tool_calls == calls


def test_llama31_text_reply():
    parsed = LLAMA31_JSON.parse_response("It is sunny in Paris.<|eot_id|>", think=False)
    assert parsed.error is None and parsed.tool_calls is None and parsed.reply == "It is sunny in Paris."


@pytest.mark.parametrize("body, problem", [
    ('{"name": "f", "parameters": {"a": 1}', "tool call"),            # truncated JSON
    ('{"name": "f", "parameters": {}, "x": 1}', "exactly the keys"),
    ('{"name": "f", "parameters": [1]}', "parameters must be a JSON object"),
    ('{"name": "", "parameters": {}}', "non-empty"),
    ('{"name": "f", "parameters": {"a": 1, "a": 2}}', "duplicate"),
    ('{"name": "f", "parameters": {}};', "';'"),
    ('[]', "empty list"),
    ('Sure. <|python_tag|>{"name": "f", "parameters": {}}', "after text"),
    ('<|python_tag|>', "without a call"),
])
def test_llama31_malformed_calls_are_errors(body, problem):
    parsed = LLAMA31_JSON.parse_response(body, think=False)
    assert parsed.tool_calls is None and parsed.error is not None and problem in parsed.error


def test_think_rules_are_the_qwen3_ones():
    for text in ("no think", "<think>a</think><think>b</think>", "x<think>a</think>", "</think>a<think>"):
        assert (LLAMA31_JSON.parse_response(text).error is None) == (qwen3.parse_response(text).error is None)
    assert "think tag" in LLAMA31_JSON.parse_response("<think>a</think>{}", think=False).error


def test_round_trip_of_every_asset_call(records):
    for fmt in FORMATS.values():
        renderer = chat_renderer(fmt=fmt)
        for record in records:
            answer = record["messages"][-1]
            prompt, target = renderer.example(record)
            parsed = renderer.parse_completion(target)
            assert parsed.error is None, (fmt.name, record["id"], parsed.error)
            assert parsed.tool_calls == (answer.get("tool_calls") or None)


def test_llama31_prompt_has_metas_instructions_and_no_hermes_text(records):
    record = next(r for r in records if r["messages"][-1].get("tool_calls"))
    prompt, target = chat_renderer(fmt="llama3.1-json").example(record)
    tool_text = "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in record["tools"])
    assert prompt.startswith("<|im_start|>system\n")
    assert LLAMA31_TOOLS_INTRO + tool_text.rstrip("\n") in prompt
    assert "<tool_call>" not in prompt + target and "<tools>" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert '"parameters": ' in target and target.endswith("<|im_end|>\n")


def test_reward_applies_to_calls_parsed_from_either_format():
    reference = {"role": "assistant", "content": "",
                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]}
    for fmt in (HERMES, LLAMA31_JSON):
        renderer = chat_renderer(fmt=fmt)

        def reward(completion):
            return similarity_reward(renderer.full_response(completion), reference, [WEATHER], fmt=renderer)

        right = renderer.render_answer(reference["tool_calls"], reasoning="weather")
        half = renderer.render_answer([{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}])
        unknown = renderer.render_answer([{"name": "get_time", "arguments": {}}])
        assert reward(right) == 1.0
        assert reward(half) == pytest.approx(1 / 2)       # 1 of 2 argument values right
        assert reward(unknown) == -1.0                    # a tool that is not offered
        assert reward(right.replace("}}", "}")) == -1.0   # malformed JSON
        assert reward(renderer.render_answer(None, reply="I cannot.")) == 0.0


# ---------------------------------------------------------------- templates and errors

class _Template:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_template_detection():
    assert not template_handles_tools(_Template(None))
    assert not template_handles_tools(_Template("{% for m in messages %}{{ m.content }}{% endfor %}"))
    assert template_format(_Template("{{ tools }} <tool_call>")) is HERMES
    assert template_format(_Template('{{ tools }} {"name": "x", "parameters": {}}')) is LLAMA31_JSON
    assert template_format(_Template("{{ tools }} <|python_tag|>")) is LLAMA31_JSON
    with pytest.raises(ValueError, match="tool_format: the model's chat template handles tools in a format"):
        chat_renderer(_Template("{{ tools }} [TOOL_CALLS]"))
    renderer = chat_renderer(_Template("{{ tools }} [TOOL_CALLS]"), template="qwen3")
    assert renderer.layout == "qwen3-layout"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tool_call_format: unknown 'xml'"):
        get_format("xml")
    with pytest.raises(ValueError, match=r"calls\[0\].name"):
        LLAMA31_JSON.render_calls([{"name": "", "arguments": {}}])
    with pytest.raises(ValueError, match="calls: expected a non-empty list"):
        HERMES.render_calls([])
    with pytest.raises(ValueError, match="completion: expected a str"):
        chat_renderer().parse_completion(None)
