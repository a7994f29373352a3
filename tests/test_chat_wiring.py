"""The one chat-format component (``chat.templates.ChatRenderer``) as the stages, the
reward and BFCL eval use it: config keys, the choice rule, the Qwen3 path unchanged,
the reward on other formats, CKD data rendering and the eval command's options."""

import json
from pathlib import Path

import pytest

from star_train.chat import qwen3
from star_train.chat.formats import HERMES, LLAMA31_JSON, LLAMA31_TOOLS_INTRO
from star_train.chat.templates import QWEN3, QWEN3_NO_THINK, ChatRenderer, chat_renderer
from star_train.data.examples import IGNORE, load_examples, released_pair
from star_train.data.records import build_example, load_records
from star_train.eval import bfcl, chat_format
from star_train.eval.command import tokenizer_choice
from star_train.reward import similarity_reward
from star_train.runtime.config import ConfigError, ModelSpec, from_dict
from star_train.runtime.models import load_tokenizer, model_renderer
from star_train.stages.rollouts import RolloutRunConfig

ASSETS = Path(__file__).resolve().parents[1] / "star_train" / "assets" / "xlam_sample.jsonl"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "days": {"type": "integer"}}}}
REFERENCE = {"role": "assistant", "content": "",
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]}


class _Tokenizer:
    """Just what the renderer reads of a tokenizer: its chat template, and a stand-in for
    ``apply_chat_template`` that writes the messages and tools as JSON."""

    eos_token = "<|eot_id|>"

    def __init__(self, chat_template):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
        return json.dumps({"messages": messages, "tools": tools}) + ("\nASSISTANT:" if add_generation_prompt else "")


QWEN3_TEMPLATE = "{{ tools }} <tool_call> {{ '<think>' }}"
LLAMA_TEMPLATE = '{{ tools }} {"name": x, "parameters": y} <|python_tag|>'


# ---------------------------------------------------------------- config and choice

def test_config_keys_are_checked_by_name():
    base = {"data": {"path": "x.jsonl"}, "teacher": {"model": {"path": "m"}}}
    for key, value in (("chat_template", "llama"), ("tool_format", "xml")):
        with pytest.raises(ConfigError, match=f"teacher.model.{key} must be one of .*got '{value}'"):
            from_dict(RolloutRunConfig, {**base, "teacher": {"model": {"path": "m", key: value}}})
    cfg = from_dict(RolloutRunConfig, base)
    assert (cfg.teacher.model.chat_template, cfg.teacher.model.tool_format) == ("auto", "auto")


def test_the_choice_rule(tokenizer):
    # The offline Qwen3 tokenizer (no template) and a Qwen3 template: the Qwen3 format itself.
    assert model_renderer(ModelSpec(), tokenizer) == ChatRenderer(HERMES, "qwen3-layout", tokenizer)
    assert model_renderer(ModelSpec(), None) == QWEN3 and QWEN3.name == "qwen3" and QWEN3.native
    qwen_template = chat_renderer(_Tokenizer(QWEN3_TEMPLATE))
    assert qwen_template.layout == "qwen3-layout" and qwen_template.native
    assert chat_renderer(_Tokenizer(QWEN3_TEMPLATE), template="model").layout == "model-template"
    # A template without tools (SmolLM2's): the Qwen3 layout in the asked format.
    plain = chat_renderer(_Tokenizer("{{ messages }}"), "llama3.1-json")
    assert (plain.layout, plain.fmt, plain.name, plain.native) == ("qwen3-layout", LLAMA31_JSON,
                                                                   "qwen3/llama3.1-json", False)
    # A Llama 3.1 template: its own layout and format.
    llama = chat_renderer(_Tokenizer(LLAMA_TEMPLATE))
    assert (llama.layout, llama.fmt, llama.name, llama.think) == ("model-template", LLAMA31_JSON,
                                                                  "model/llama3.1-json", False)
    assert llama.end_token == "<|eot_id|>" and "<|eom_id|>" in llama.stop_tokens
    with pytest.raises(ConfigError, match="policy.model.tool_format: 'hermes', but the model's chat "
                                          "template writes llama3.1-json calls"):
        model_renderer(ModelSpec(tool_format="hermes"), _Tokenizer(LLAMA_TEMPLATE), "policy.model")
    with pytest.raises(ConfigError, match="student.model.chat_template: 'model' needs"):
        model_renderer(ModelSpec(chat_template="model"), tokenizer, "student.model")
    with pytest.raises(ValueError, match="chat_template: unknown 'x'"):
        chat_renderer(template="x")


# ---------------------------------------------------------------- the Qwen3 path unchanged

def test_eval_names_are_views_of_the_one_component():
    assert chat_format.QWEN3 is QWEN3 and chat_format.QWEN3_NO_THINK is QWEN3_NO_THINK
    assert chat_format.ChatFormat is ChatRenderer
    assert set(chat_format.FORMATS) == {"qwen3", "qwen3-no-think"}


def test_bfcl_prompts_and_turns_are_the_qwen3_text():
    sample = bfcl.load_category("simple", 1)[0]
    tools = bfcl.prompt_tools(sample.functions, "simple")
    assert bfcl.build_prompt(sample) == qwen3.render_prompt(sample.messages, tools) + "<think>\n"
    assert bfcl.build_prompt(sample, QWEN3_NO_THINK) == qwen3.render_prompt(
        sample.messages, tools, enable_thinking=False)
    completion = 'hm\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    turn = QWEN3.parse_turn(completion)
    assert turn.calls == [{"name": "f", "arguments": {"a": 1}}] and turn.error is None
    assert turn.message == {"role": "assistant", "reasoning_content": "hm", "content": "",
                            "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
    bad = QWEN3.parse_turn("no think close")
    assert bad.calls is None and bad.message == {"role": "assistant", "content": "<think>\nno think close"}
    no_think = QWEN3_NO_THINK.parse_turn("Sunny.")
    assert no_think.calls == [] and no_think.message["content"] == "Sunny."
    assert QWEN3_NO_THINK.parse_turn("<think>x</think>Sunny.").calls is None  # a second think block


def test_the_reward_reads_the_qwen3_format_as_written():
    tools = [WEATHER]
    for text in ('<think>\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                 '{"city": "Paris", "days": 2, "days": 3}}\n</tool_call><|im_end|>',  # released: last wins
                 "<think>\nx</think>\n\n<tool_call>\n{\"name\": \"get_weather\"",
                 "<think>\n</think>\n\nIt rains.<|im_end|>"):
        for rules in ("released", "strict"):
            want = similarity_reward(text, REFERENCE, tools, rules=rules)
            assert similarity_reward(text, REFERENCE, tools, rules=rules, fmt=QWEN3) == want
            assert similarity_reward(text, REFERENCE, tools, rules=rules, fmt="hermes") == want


# ---------------------------------------------------------------- other formats

def test_the_reward_on_llama31_calls_by_hand():
    tools = [WEATHER]

    def reward(body, **kwargs):
        return similarity_reward("<think>\nr\n</think>\n\n" + body, REFERENCE, tools,
                                 fmt="llama3.1-json", **kwargs)

    assert reward('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|im_end|>') == 1.0
    assert reward('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}') == 0.5
    # two calls, one right: credit 1 over 2 predicted calls
    assert reward('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
                  '{"name": "get_weather", "parameters": {"city": "Rome", "days": 5}}') == 0.5
    assert reward('{"name": "get_time", "parameters": {}}') == -1.0            # not offered
    assert reward('{"name": "get_weather", "parameters": {"town": "Paris"}}') == -1.0  # undeclared
    assert reward('{"name": "get_weather", "parameters": {"city": "Paris"') == -1.0    # unreadable
    assert reward("<tool_call>\n{}\n</tool_call>") == 0.0  # text in this format: no call made
    assert reward('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
                  rules="strict") == 1.0
    with pytest.raises(ValueError, match="reference must be an assistant message"):
        similarity_reward("{", {"role": "user"}, tools, fmt="llama3.1-json")


def test_a_model_templates_completion_is_scored_without_a_think_block():
    llama = chat_renderer(_Tokenizer(LLAMA_TEMPLATE))
    reply = {"role": "assistant", "content": "It rains."}
    assert similarity_reward(llama.full_response("It rains.<|eot_id|>"), reply, [WEATHER], fmt=llama) == 1.0
    # Released rules compare the reply with the reference label "It rains.<|im_end|>": a
    # reply cut before the end of turn is not identical, so it gets ROUGE-L over the
    # label's words "it rains im end": recall 2/4, precision 1, F = 2/3.
    assert similarity_reward("It rains.", reply, [WEATHER], fmt=llama) == pytest.approx(2 / 3)
    call = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eom_id|>'
    assert similarity_reward(call, REFERENCE, [WEATHER], fmt=llama) == 1.0
    assert similarity_reward("<think>a</think>" + call, REFERENCE, [WEATHER], fmt=llama) == -1.0


def test_ckd_examples_render_in_the_models_format(tokenizer, tmp_path):
    records = load_records(ASSETS)[:4]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    llama = chat_renderer(tokenizer, "llama3.1-json")
    for fmt in ("template", "released"):
        default = load_examples(str(path), tokenizer, fmt=fmt)
        assert [e.input_ids.tolist() for e in load_examples(str(path), tokenizer, fmt=fmt, renderer=QWEN3)] == \
            [e.input_ids.tolist() for e in default]
        examples = load_examples(str(path), tokenizer, fmt=fmt, renderer=llama)
        for record, example in zip(records, examples):
            ids, labels = example.input_ids.tolist(), example.labels.tolist()
            prompt_len = labels.count(IGNORE)
            prompt = tokenizer.decode(ids[:prompt_len])
            assert LLAMA31_TOOLS_INTRO in prompt and "<tools>" not in prompt
            target = tokenizer.decode(ids[prompt_len:])
            for call in record["messages"][-1].get("tool_calls") or []:
                assert f'{{"name": "{call["name"]}", "parameters": ' in target
            if fmt == "template":
                assert prompt + target == "".join(build_example(record, llama)).removesuffix("\n")
            else:
                assert (prompt, target.removesuffix("<|im_end|>")) == released_pair(record, renderer=llama)
    with pytest.raises(ValueError, match="data.format: 'released' .* 'model/llama3.1-json'"):
        released_pair(records[0], renderer=chat_renderer(_Tokenizer(LLAMA_TEMPLATE)))


def test_eval_tokenizer_choice(tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_text("{}")
    assert tokenizer_choice(str(tmp_path / "bare"), "auto") == "qwen3"   # a Qwen3 saved without one
    assert tokenizer_choice(str(tmp_path / "own"), "auto") == "model"
    assert tokenizer_choice(str(tmp_path / "m.gguf"), "auto") == "model"  # a GGUF holds its own
    assert tokenizer_choice(str(tmp_path / "own"), "qwen3") == "qwen3"
    # The stages' rule is the same: a folder without tokenizer files gets the offline Qwen3 one.
    assert len(load_tokenizer(str(tmp_path / "bare"))) == 151_669


def test_eval_command_names_a_bad_option(tiny_qwen3_folder, capsys):
    from star_train import cli

    assert cli.main(["eval", "--model", str(tiny_qwen3_folder), "--categories", "simple",
                     "--limit", "1", "--chat-template", "model", "--dtype", "float32",
                     "--device", "cpu"]) == 2
    assert "--chat-template: 'model' needs a tokenizer whose chat template reads tools" in \
        capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny_qwen3_folder), "--categories", "simple",
                     "--tokenizer", "model", "--device", "cpu"]) == 2
    assert "--tokenizer model: " in capsys.readouterr().err


@pytest.fixture
def tiny_qwen3_folder(tmp_path):
    import torch

    from star_train.demo import tiny_qwen3
    from star_train.runtime.config import ModelSpec as Spec
    from star_train.runtime.models import load_model

    spec = tiny_qwen3(32, 1, seed=0)
    load_model(Spec(config=spec["config"], seed=spec["seed"]), torch.float32,
               torch.device("cpu")).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# ---------------------------------------------------------------- a real tool-aware template

QWEN3_JINJA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen3_chat_template.jinja"


@pytest.mark.skipif(not QWEN3_JINJA.is_file(), reason=f"shared data file missing: {QWEN3_JINJA}")
def test_the_model_template_layout_through_transformers(tokenizer):
    """The Qwen3 tokenizer given Qwen3's own chat template: ``auto`` keeps the Qwen3 layout
    (the offline path), ``model`` renders through ``apply_chat_template`` (jinja), which is
    the Qwen3 text with the tools in the OpenAI wrapping and no think block opened."""
    import copy

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = QWEN3_JINJA.read_text(encoding="utf-8")
    assert chat_renderer(templated).native  # auto: a Qwen3 template keeps the Qwen3 layout
    model = chat_renderer(templated, template="model")
    assert (model.layout, model.fmt, model.name) == ("model-template", HERMES, "model/hermes")
    record = next(r for r in load_records(ASSETS) if r["messages"][-1].get("tool_calls"))
    messages, tools = record["messages"], record["tools"]
    prompt, target = model.example(record)
    assert prompt == qwen3.render_prompt(messages[:-1], tools, tool_style="openai")
    assert prompt + target == qwen3.render_chat(messages, tools, tool_style="openai")
    # What the model writes after that prompt is read without a think block opened for it.
    completion = target.removesuffix("\n")
    assert model.parse_completion(completion).tool_calls == messages[-1]["tool_calls"]
    assert similarity_reward(model.full_response(completion), messages[-1], tools, fmt=model) == 1.0
