"""BFCL v3 multi-turn: the runner against BFCL's environments, judged by BFCL's own checker.

Ground truth is replayed through the runner with a scripted model: every ground-truth call
of a turn is one step (a Qwen3 tool call), then a text reply ends the turn. BFCL's
checker must accept it; corrupted replays must fail.
"""

import ast
import importlib
import inspect
import json

import pytest

from star_train.chat.qwen3 import THINK_OPEN
from star_train.eval import multi_turn as mt

SAMPLE_INDICES = (0, 57, 123, 199)  # spread over each category's 200 samples
TEXT_REPLY = "\n</think>\n\nDone."


def _method_parameters(sample, name):
    utils = mt._bfcl_multi_turn()[0]
    for class_name in sample.involved_classes:
        cls = getattr(importlib.import_module(utils.CLASS_FILE_PATH_MAPPING[class_name]),
                      class_name)
        if hasattr(cls, name):
            return [p for p in inspect.signature(getattr(cls, name)).parameters if p != "self"]
    raise AssertionError(f"{sample.id}: no environment method {name}")


def ground_truth_call(sample, call_string):
    """BFCL's ``name(a, k=v)`` ground-truth string as a ``{"name", "arguments"}`` call."""
    node = ast.parse(call_string, mode="eval").body
    names = _method_parameters(sample, node.func.id)
    arguments = {names[i]: ast.literal_eval(arg) for i, arg in enumerate(node.args)}
    arguments.update({kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
    return {"name": node.func.id, "arguments": arguments}


def call_completion(calls):
    blocks = "\n".join("<tool_call>\n" + json.dumps(c) + "\n</tool_call>" for c in calls)
    return "\n</think>\n\n" + blocks


def replay_script(sample, turns):
    """Completions that make ``turns`` (per turn, its call strings), one call per step."""
    script = []
    for turn in turns:
        script += [call_completion([ground_truth_call(sample, s)]) for s in turn]
        script.append(TEXT_REPLY)
    return script


class ScriptedModel:
    """A generate_fn playing each sample's script; conversations advance in lockstep."""

    def __init__(self, samples, scripts):
        self.samples, self.scripts = samples, {s.id: list(scripts[s.id]) for s in samples}
        self.prompts = {s.id: [] for s in samples}

    def __call__(self, prompts):
        active = [s for s in self.samples if self.scripts[s.id]]
        assert len(active) == len(prompts)  # one prompt per unfinished conversation
        for sample, prompt in zip(active, prompts):
            assert prompt.endswith("<|im_start|>assistant\n" + THINK_OPEN)
            self.prompts[sample.id].append(prompt)
        return [self.scripts[s.id].pop(0) for s in active]


def run_replay(samples, turns_for):
    scripts = {s.id: replay_script(s, turns_for(s)) for s in samples}
    model = ScriptedModel(samples, scripts)
    rows = mt.run_conversations(samples, model)
    assert all(not script for script in model.scripts.values())  # every step was asked for
    return rows, model


def _samples(category):
    everything = mt.load_category(category)
    return [everything[i] for i in SAMPLE_INDICES]


@pytest.mark.parametrize("category", mt.MULTI_TURN_CATEGORIES)
def test_ground_truth_replay_passes_bfcls_checker(category):
    samples = _samples(category)
    rows, _ = run_replay(samples, lambda s: s.ground_truth)
    assert [(r["id"], r["correct"], r["error"]) for r in rows] == [
        (s.id, True, None) for s in samples]
    assert [len(r["calls"]) for r in rows] == [len(s.ground_truth) for s in samples]


def _drop_last_answer(sample):
    turns = [list(turn) for turn in sample.ground_truth]
    last = max(i for i, turn in enumerate(turns) if turn)
    turns[last] = []
    return turns


def _answer_one_turn_late(sample):
    # Every answer arrives a turn after it was asked for (the state check after the turn fails).
    return [[]] + [list(turn) for turn in sample.ground_truth[:-1]]


@pytest.mark.parametrize("corrupt", [_drop_last_answer, _answer_one_turn_late])
@pytest.mark.parametrize("category", mt.MULTI_TURN_CATEGORIES)
def test_corrupted_replay_fails(category, corrupt):
    rows, _ = run_replay(_samples(category), corrupt)
    assert [r["correct"] for r in rows] == [False] * len(rows)
    assert all(r["error"].startswith("multi_turn:") for r in rows)


def test_tool_results_come_back_as_tool_messages():
    sample = mt.load_category("multi_turn_base", 1)[0]
    first = ground_truth_call(sample, sample.ground_truth[0][0])
    assert first == {"name": "cd", "arguments": {"folder": "document"}}
    rows, model = run_replay([sample], lambda s: s.ground_truth)
    second_prompt = model.prompts[sample.id][1]
    # The call, then the environment's answer as a Qwen3 tool response (a user turn).
    assert second_prompt.endswith(
        '{"name": "cd", "arguments": {"folder": "document"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"current_working_directory": "document"}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n" + THINK_OPEN)
    assert rows[0]["calls"][0][0] == ["cd(folder='document')"]


def test_held_out_functions_arrive_in_their_turn():
    sample = mt.load_category("multi_turn_miss_func", 1)[0]
    (turn, docs), = sample.held_out.items()
    assert turn == 3 and [d["name"] for d in docs] == ["sort"] and sample.turns[turn] == []
    assert "sort" not in [d["name"] for d in sample.functions]
    _, model = run_replay([sample], lambda s: s.ground_truth)
    prompts = model.prompts[sample.id]
    steps_before = sum(len(t) + 1 for t in sample.ground_truth[:turn])
    tool_line = '"name": "sort"'
    assert not any(tool_line in p.split("\n</tools>")[0] for p in prompts[:steps_before])
    held_out_prompt = prompts[steps_before]
    assert tool_line in held_out_prompt.split("\n</tools>")[0]
    constant = mt._bfcl_multi_turn()[2]
    assert held_out_prompt.endswith(constant.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
                                    + "<|im_end|>\n<|im_start|>assistant\n" + THINK_OPEN)


def test_a_model_that_never_stops_is_force_quit_after_the_step_limit():
    sample = mt.load_category("multi_turn_base", 1)[0]
    calls = []

    def always_pwd(prompts):
        calls.append(len(prompts))
        return [call_completion([{"name": "pwd", "arguments": {}}])] * len(prompts)
    row, = mt.run_conversations([sample], always_pwd)
    limit = mt.step_limit()
    assert limit == 20  # BFCL v3's MAXIMUM_STEP_LIMIT
    assert len(calls) == limit + 1  # the step that exceeds the limit ends the dialogue
    assert len(row["calls"]) == 1 and len(row["calls"][0]) == limit + 1
    assert not row["correct"] and row["error"].startswith("multi_turn:force_terminated")


def test_unparseable_output_ends_the_turn_and_runs_are_independent():
    sample = mt.load_category("multi_turn_base", 1)[0]
    row, = mt.run_conversations([sample], lambda prompts: ["no think block"] * len(prompts))
    assert row["completions"] == [["no think block"]] * len(sample.turns)
    assert row["calls"] == [[]] * len(sample.turns)
    assert row["error"].startswith("multi_turn:empty_turn_model_response")
    # BFCL keeps environments in module globals; none may survive a run, or a second run
    # of the same sample would start from the first one's state.
    namespace = vars(mt._bfcl_multi_turn()[0])
    assert not [name for name in namespace if name.endswith("_instance")]
    first, = run_replay([sample], lambda s: s.ground_truth)[0]
    again, = run_replay([sample], lambda s: s.ground_truth)[0]
    assert first["correct"] and again["correct"]


def test_a_call_name_cannot_run_code(tmp_path):
    sample = mt.load_category("multi_turn_base", 1)[0]
    marker = tmp_path / "ran"
    evil = {"name": f"__import__('pathlib').Path({str(marker)!r}).touch", "arguments": {}}
    replies = iter([call_completion([evil])] + [TEXT_REPLY] * 10)
    row, = mt.run_conversations([sample], lambda prompts: [next(replies) for _ in prompts])
    assert not marker.exists()
    assert not row["correct"]
