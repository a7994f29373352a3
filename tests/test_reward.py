"""Sim-RL reward (star_train/reward.py); the sweep over the example rows is in
test_reward_sweep.py, the released rules against an oracle of the released code in
test_reward_released.py, the parser in test_parse_response.py, tool specs in test_tools.py.

(Over 400 lines: one hand-computed case per reward rule, for both rule sets; splitting it
would scatter the rules' cases.) Expected values are worked out by hand in comments so a
reader can check them. The cases
up to "GRPO helpers" are the ``"strict"`` rule set's; the released rules (the default)
have their own hand-worked section at the end.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest

from star_train.data.tools import (
    call_is_declared,
    tools_by_name,
)
from star_train.reward import (
    INVALID_REWARD,
    group_advantages,
    keep_group,
    parse_response,
    text_similarity,
)
from star_train.reward import similarity_reward as reward_with_rules


def similarity_reward(response, reference, tools):
    """The ``"strict"`` rules, which the hand-worked cases below were written for."""
    return reward_with_rules(response, reference, tools, rules="strict")


def released(response, reference, tools):
    return reward_with_rules(response, reference, tools)  # the default rules

DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "star_example_messages.jsonl"

# Tools used by the hand-made cases: one per parameter shape.
TOOL_F = {"name": "f", "description": "",
          "parameters": {"type": "object",
                         "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                                        "c": {"type": "boolean"}, "d": {"type": "object"}},
                         "required": ["a"]}}
TOOL_G = {"name": "g", "description": "",
          "parameters": {"x": {"type": "int", "description": ""},
                         "y": {"type": "int", "description": ""},
                         "z": {"type": "int", "description": ""}}}
TOOL_EMPTY = {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}
TOOLS = [TOOL_F, TOOL_G, TOOL_EMPTY]


def render(calls, reasoning="Let me think.") -> str:
    """A response as the rollout code scores it: `<think>\\n` prepended, calls as blocks."""
    blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>"
                       for n, a in calls)
    return f"<think>\n{reasoning}\n</think>\n\n{blocks}"


def text_response(reply: str) -> str:
    return f"<think>\nok\n</think>\n\n{reply}"


def call_reference(*calls, content=None) -> dict:
    return {"role": "assistant", "content": content,
            "tool_calls": [{"name": n, "arguments": a} for n, a in calls]}


def text_reference(content) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": None}


# ------------------------------------------------ independent ROUGE-L (no stemming)

def lcs_length(xs, ys) -> int:
    previous = [0] * (len(ys) + 1)
    for x in xs:
        current = [0]
        for j, y in enumerate(ys):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def plain_rouge_l_f(predicted: str, reference: str) -> float:
    """ROUGE-L F over lowercase alphanumeric tokens, no stemming."""
    p = re.findall(r"[a-z0-9]+", predicted.lower())
    r = re.findall(r"[a-z0-9]+", reference.lower())
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# Words short enough (<= 3 letters) that the Porter stemmer, which rouge_score applies
# only to tokens longer than 3, leaves them alone.
UNSTEMMED_PAIRS = [
    ("the cat sat on the mat", "the cat lay on the mat"),  # LCS 5 of 6/6: F = 5/6
    ("a b c d", "a c"),                                    # LCS 2: P 2/4, R 2/2 -> F 2/3
    ("one two six ten", "ten six two one"),                # LCS 1: P = R = 1/4 -> F 1/4
    ("New York, NY", "new york"),                          # LCS 2: P 2/3, R 1 -> F 0.8
    ("red fox", "big dog"),                                # LCS 0 -> F 0
]


@pytest.mark.parametrize("predicted,reference", UNSTEMMED_PAIRS)
def test_rouge_matches_independent_lcs(predicted, reference):
    assert text_similarity(predicted, reference) == pytest.approx(plain_rouge_l_f(predicted, reference))


def test_rouge_hand_values():
    assert text_similarity(*UNSTEMMED_PAIRS[0]) == pytest.approx(5 / 6)
    assert text_similarity(*UNSTEMMED_PAIRS[1]) == pytest.approx(2 / 3)
    assert text_similarity(*UNSTEMMED_PAIRS[2]) == pytest.approx(1 / 4)
    assert text_similarity(*UNSTEMMED_PAIRS[3]) == pytest.approx(0.8)  # 2 * 2/3 * 1 / (5/3)


def test_rouge_uses_stemming():
    # Unstemmed, no token is shared (F 0); stemmed, running->run and dogs->dog (F 1).
    assert plain_rouge_l_f("running dogs", "run dog") == 0.0
    assert text_similarity("running dogs", "run dog") == pytest.approx(1.0)


# ------------------------------------------------------------------ malformed responses

MALFORMED = {
    "no think block": "just an answer",
    "two think blocks": "<think>a</think><think>b</think> hi",
    "missing close": "<think>a hi",
    "missing open": "a</think> hi",
    "close before open": "</think>x<think> hi",
    "text before think": "preamble <think>a</think> hi",
    "bad json": '<think>a</think><tool_call>{"name": "f", "arguments": {"a": }</tool_call>',
    "empty block": "<think>a</think><tool_call></tool_call>",
    "json not object": '<think>a</think><tool_call>["f"]</tool_call>',
    "missing arguments": '<think>a</think><tool_call>{"name": "ping"}</tool_call>',
    "extra key": '<think>a</think><tool_call>{"name": "ping", "arguments": {}, "id": 1}</tool_call>',
    "arguments not object": '<think>a</think><tool_call>{"name": "f", "arguments": "{}"}</tool_call>',
    "empty name": '<think>a</think><tool_call>{"name": "", "arguments": {}}</tool_call>',
    "duplicate key": '<think>a</think><tool_call>{"name": "f", "arguments": {"a": "x", "a": "y"}}</tool_call>',
    "NaN": '<think>a</think><tool_call>{"name": "f", "arguments": {"b": NaN}}</tool_call>',
    "unclosed block": '<think>a</think><tool_call>{"name": "ping", "arguments": {}}',
    "stray close": '<think>a</think>{"name": "ping", "arguments": {}}</tool_call>',
    "nested blocks": '<think>a</think><tool_call><tool_call>{"name": "ping", "arguments": {}}'
                     '</tool_call></tool_call>',
    "second block bad": '<think>a</think><tool_call>{"name": "ping", "arguments": {}}</tool_call>'
                        '<tool_call>{nope}</tool_call>',
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_responses_score_minus_one(text):
    assert parse_response(text).error
    assert similarity_reward(text, call_reference(("ping", {})), TOOLS) == INVALID_REWARD
    assert similarity_reward(text, text_reference("hi"), TOOLS) == INVALID_REWARD


def test_unknown_tool_scores_minus_one():
    response = render([("f", {"a": "x"}), ("nope", {})])
    assert similarity_reward(response, call_reference(("f", {"a": "x"})), TOOLS) == -1.0


def test_undeclared_argument_scores_minus_one():
    # "x" belongs to g, not f; validity is checked before the reference, so -1 even vs text.
    response = render([("f", {"a": "x", "x": 1})])
    assert similarity_reward(response, call_reference(("f", {"a": "x"})), TOOLS) == -1.0
    assert similarity_reward(response, text_reference("hi"), TOOLS) == -1.0


# -------------------------------------------------------- text references

def test_text_reference_rouge():
    reference = text_reference("the cat lay on the mat")
    assert similarity_reward(text_response("the cat sat on the mat"), reference, TOOLS) == pytest.approx(5 / 6)


def test_text_reference_identical_and_empty_rules():
    # Identical: 1 even where ROUGE's tokenizer sees no tokens (it would give 0).
    assert similarity_reward(text_response("?!"), text_reference("?!"), TOOLS) == 1.0
    assert similarity_reward(text_response("?!"), text_reference("!?"), TOOLS) == 0.0
    # Empty or whitespace-only reply vs a real reference: 0.
    assert similarity_reward(text_response(""), text_reference("hello"), TOOLS) == 0.0
    assert similarity_reward(text_response("  \n\t "), text_reference("hello"), TOOLS) == 0.0
    # Empty reference (content None counts as "") vs a real reply: 0.
    assert similarity_reward(text_response("hello"), text_reference(None), TOOLS) == 0.0
    # Both blank: identical after stripping, so 1.
    assert similarity_reward(text_response(" "), text_reference(""), TOOLS) == 1.0


def test_text_reference_but_model_calls_tools_scores_zero():
    assert similarity_reward(render([("ping", {})]), text_reference("hello"), TOOLS) == 0.0
    # An empty tool_calls list is a text reference too.
    reference = {"role": "assistant", "content": "hello", "tool_calls": []}
    assert similarity_reward(render([("ping", {})]), reference, TOOLS) == 0.0


# ------------------------------------------------------- tool-call references

def test_tool_reference_and_text_reply_scores_zero():
    assert similarity_reward(text_response("I would call f."), call_reference(("f", {"a": "x"})), TOOLS) == 0.0


def test_exact_call_scores_one():
    calls = [("f", {"a": "new york", "b": 3, "c": True, "d": {"k": [1, 2]}})]
    assert similarity_reward(render(calls), call_reference(*calls), TOOLS) == 1.0


def test_partial_string_argument():
    # a: "new york" vs "new york city": LCS 2, P 2/2, R 2/3, F = 2*(1*2/3)/(5/3) = 0.8
    # b: 3 == 3 -> 1.  similarity = (0.8 + 1) / (2 predicted keys + 0 missing) = 0.9
    reward = similarity_reward(render([("f", {"a": "new york", "b": 3})]),
                               call_reference(("f", {"a": "new york city", "b": 3})), TOOLS)
    assert reward == pytest.approx(0.9)


def test_missing_and_extra_keys():
    # Reference has a, b; prediction only a: 1 / (1 predicted + 1 missing) = 0.5
    reference = call_reference(("f", {"a": "x", "b": 3}))
    assert similarity_reward(render([("f", {"a": "x"})]), reference, TOOLS) == pytest.approx(0.5)
    # Prediction a, b, c vs reference a: 1 / (3 predicted + 0 missing) = 1/3
    reward = similarity_reward(render([("f", {"a": "x", "b": 3, "c": False})]),
                               call_reference(("f", {"a": "x"})), TOOLS)
    assert reward == pytest.approx(1 / 3)
    # a wrong, b right, c missing, d extra: (0 + 1) / (3 predicted {a, b, d} + 1 missing {c}) = 0.25
    reward = similarity_reward(render([("f", {"a": "red", "b": 3, "d": {}})]),
                               call_reference(("f", {"a": "blue", "b": 3, "c": True})), TOOLS)
    assert reward == pytest.approx(0.25)


def test_extra_missing_and_wrong_calls():
    exact = ("f", {"a": "x"})
    # One exact + one unreferenced ping: credit 1 / (2 predicted + 0 unmatched) = 0.5
    assert similarity_reward(render([exact, ("ping", {})]), call_reference(exact), TOOLS) == 0.5
    # One exact, reference also wants g: 1 / (1 predicted + 1 unmatched) = 0.5
    assert similarity_reward(render([exact]), call_reference(exact, ("g", {"x": 1})), TOOLS) == 0.5
    # Only a wrong (declared) tool: 0 / (1 predicted + 1 unmatched) = 0
    assert similarity_reward(render([("g", {"x": 1})]), call_reference(exact), TOOLS) == 0.0
    # Same call twice vs one reference: first matches (1), second finds none left:
    # 1 / (2 predicted + 0 unmatched) = 0.5
    assert similarity_reward(render([exact, exact]), call_reference(exact), TOOLS) == 0.5


def test_empty_arguments():
    # Both calls without arguments: argument similarity 1 by decision (0/0 otherwise).
    assert similarity_reward(render([("ping", {})]), call_reference(("ping", {})), TOOLS) == 1.0
    assert similarity_reward(render([("ping", {}), ("ping", {})]),
                             call_reference(("ping", {}), ("ping", {})), TOOLS) == 1.0
    # No predicted arguments vs reference {x: 1}: 0 / (0 + 1) = 0; the call is still matched,
    # so the reward is 0 / (1 predicted + 0 unmatched) = 0.
    assert similarity_reward(render([("g", {})]), call_reference(("g", {"x": 1})), TOOLS) == 0.0


def test_value_types():
    def score(predicted, reference, key="d"):
        return similarity_reward(render([("f", {key: predicted})]), call_reference(("f", {key: reference})), TOOLS)

    assert score(1, True) == 0.0          # bool is not the number 1 ("1" vs "true")
    assert score(True, 1) == 0.0
    assert score(False, 0) == 0.0
    assert score(True, True) == 1.0
    assert score(1.0, 1) == 1.0           # numbers compare by value
    assert score(2, 3) == 0.0
    assert score("5", 5) == 1.0           # mixed types: string forms "5" == "5"
    assert score("true", True) == 1.0     # JSON string form of True is "true"
    assert score(None, None) == 1.0
    assert score(None, "x") == 0.0
    assert score({"p": 1, "q": [1, 2]}, {"q": [1.0, 2], "p": 1}) == 1.0  # key order, 1.0 == 1
    assert score([1, 2], [2, 1]) == 0.0   # list order matters
    assert score({"p": "new york"}, {"p": "new york city"}) == 0.0  # nested: all or nothing
    assert score("", "") == 1.0           # identical strings
    assert score("", "x") == 0.0


def test_reference_content_beside_calls_is_ignored_and_string_arguments_accepted():
    response = render([("f", {"a": "x", "b": 2})])
    plain = call_reference(("f", {"a": "x", "b": 3}))
    with_text = {"role": "assistant", "content": "Let me look that up.",
                 "tool_calls": [{"type": "function",
                                 "function": {"name": "f", "arguments": json.dumps({"a": "x", "b": 3})}}]}
    # (1 + 0) / 2 = 0.5 either way
    assert similarity_reward(response, plain, TOOLS) == 0.5
    assert similarity_reward(response, with_text, TOOLS) == 0.5


# ----------------------------------------------------- matching order

def test_greedy_matching_can_depend_on_predicted_order():
    # References R1 = g(x=1, y=2, z=3), R2 = g(x=1, y=5, z=6).
    # A1 = g(x=1, y=2): sim(A1,R1) = 2/(2+1) = 2/3, sim(A1,R2) = 1/3.
    # A2 = g(x=1, y=2, z=3): sim(A2,R1) = 3/3 = 1, sim(A2,R2) = 1/3.
    # Order A1, A2: A1 takes R1 (2/3), A2 gets R2 (1/3) -> (2/3 + 1/3) / 2 = 1/2.
    # Order A2, A1: A2 takes R1 (1), A1 gets R2 (1/3) -> (1 + 1/3) / 2 = 2/3.
    reference = call_reference(("g", {"x": 1, "y": 2, "z": 3}), ("g", {"x": 1, "y": 5, "z": 6}))
    a1, a2 = ("g", {"x": 1, "y": 2}), ("g", {"x": 1, "y": 2, "z": 3})
    assert similarity_reward(render([a1, a2]), reference, TOOLS) == pytest.approx(1 / 2)
    assert similarity_reward(render([a2, a1]), reference, TOOLS) == pytest.approx(2 / 3)


def test_order_independent_with_distinct_names():
    predicted = [("f", {"a": "new york", "b": 3}), ("g", {"x": 1, "z": 9}), ("ping", {})]
    reference = [("f", {"a": "new york city", "b": 3}), ("g", {"x": 1, "y": 2}), ("ping", {})]
    # f: 0.9 (see test_partial_string_argument); g: 1 / (2 + 1) = 1/3; ping: 1.
    expected = (0.9 + 1 / 3 + 1) / 3
    for order in itertools.permutations(predicted):
        for ref_order in itertools.permutations(reference):
            reward = similarity_reward(render(list(order)), call_reference(*ref_order), TOOLS)
            assert reward == pytest.approx(expected)


def test_reference_order_irrelevant_for_exact_copies_with_shared_names():
    calls = [("g", {"x": 1}), ("g", {"x": 2}), ("g", {"x": 3, "y": 4})]
    for order in itertools.permutations(calls):
        assert similarity_reward(render(calls), call_reference(*order), TOOLS) == 1.0
        assert similarity_reward(render(list(order)), call_reference(*calls), TOOLS) == 1.0


# ------------------------------------------------------------ tools.py

def test_index_with_repeated_names():
    tools = [{"name": "search", "parameters": {"q": {"type": "str"}}},
             {"name": "search", "parameters": {"type": "object", "properties": {"regex": {}}}}]
    index = tools_by_name(tools)
    assert index == {"search": tools}
    assert call_is_declared(index, "search", ["q"])
    assert call_is_declared(index, "search", ["regex"])
    assert not call_is_declared(index, "search", ["q", "regex"])  # must fit one spec
    assert not call_is_declared(index, "other", [])
    response = render([("search", {"q": "x", "regex": "y"})])
    assert similarity_reward(response, call_reference(("search", {"q": "x"})), tools) == -1.0


def test_wrapped_tools_in_the_reward():
    wrapped = [{"type": "function", "function": tool} for tool in TOOLS]
    response = render([("f", {"a": "x", "b": 2})])
    # (1 + 0) / (2 predicted + 0 missing) = 0.5
    assert similarity_reward(response, call_reference(("f", {"a": "x", "b": 3})), wrapped) == 0.5
    assert similarity_reward(render([("g", {"a": "x"})]), call_reference(("g", {})), wrapped) == -1.0


# ------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_value_error_naming_the_argument():
    ok_response, ok_reference = render([("ping", {})]), call_reference(("ping", {}))
    with pytest.raises(ValueError, match="reference"):
        similarity_reward(ok_response, [ok_reference], TOOLS)
    with pytest.raises(ValueError, match="reference"):
        similarity_reward(ok_response, {"role": "user", "content": "hi"}, TOOLS)
    with pytest.raises(ValueError, match="reference"):
        similarity_reward(ok_response, {"tool_calls": [{"name": "f", "arguments": "{bad"}]}, TOOLS)
    with pytest.raises(ValueError, match="tools"):
        similarity_reward(ok_response, ok_reference, {"ping": TOOL_EMPTY})
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        similarity_reward(ok_response, ok_reference, [{"description": "no name"}])
    with pytest.raises(ValueError, match=r"tools\[1\]"):
        similarity_reward(ok_response, ok_reference, [TOOL_F, {"name": "t", "parameters": "x: int"}])
    with pytest.raises(ValueError, match="response"):
        similarity_reward(None, ok_reference, TOOLS)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([0.0, 1.0, 0.5], group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([0.0, 1.0], group_size=1)
    with pytest.raises(ValueError, match="eps"):
        group_advantages([0.0, 1.0], group_size=2, eps=0.0)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages([], group_size=2)
    with pytest.raises(ValueError, match="rewards"):
        keep_group([0.5, math.nan])


# ------------------------------------------------------------ GRPO helpers

def test_group_advantages_sample_std():
    # Group [1, 0, 0, 0]: mean 1/4; sample variance = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25,
    # std 0.5 -> advantages (1 - 0.25)/0.5 = 1.5 and (0 - 0.25)/0.5 = -0.5.
    # Group [0.5] * 4: std 0 -> all 0.
    advantages = group_advantages([1, 0, 0, 0, 0.5, 0.5, 0.5, 0.5], group_size=4, eps=1e-9)
    assert advantages == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    # eps enters the denominator: 0.75 / (0.5 + 0.5) = 0.75
    assert group_advantages([1, 0, 0, 0], group_size=4, eps=0.5)[0] == pytest.approx(0.75)


def test_keep_group_bounds_are_strict():
    assert keep_group([1.0] + [0.0] * 7, rule="reward_mean")
    assert keep_group([0.5, 0.5], rule="reward_mean")        # released: max == min -> False
    assert not keep_group([0.5, 0.5], rule="reward_mean", low=0.5, high=0.6)
    assert not keep_group([-1.0, 1.0, -1.0, 1.0, -1.0, -1.0], rule="reward_mean")  # mean -1/3
    with pytest.raises(ValueError, match="rule"):
        keep_group([0.5, 0.0], rule="mean")


def test_keep_group_released_default_bounds():
    assert not keep_group([1.0] * 8)
    assert not keep_group([0.0] * 8)
    assert keep_group([1.0] + [0.0] * 7)                       # mean 0.125
    assert not keep_group([0.0, 0.02])                         # mean 0.01: not > 0.01 + 1e-6
    assert keep_group([0.0, 0.020004])                         # mean 0.010002 > 0.010001
    assert not keep_group([1.0, 0.98])                         # mean 0.99
    assert keep_group([1.0, 0.979996])                         # mean 0.989998 < 0.989999
    assert keep_group([0.03, 0.0])                             # mean 0.015
    assert keep_group([0.5, 0.98])                             # mean 0.74


# ------------------------------------------------------------ the released rules (default)

EOT = "<|im_end|>"


def test_released_is_the_default_and_rules_are_named():
    unclosed = '<think>a</think><tool_call>{"name": "ping", "arguments": {}}'
    assert reward_with_rules(unclosed, text_reference("hi"), TOOLS) == 0.0
    assert reward_with_rules(unclosed, text_reference("hi"), TOOLS, rules="strict") == -1.0
    with pytest.raises(ValueError, match="rules"):
        reward_with_rules(unclosed, text_reference("hi"), TOOLS, rules="lenient")


def test_released_format_cases_by_hand():
    ping = call_reference(("ping", {}))
    # Unclosed block: the call is not found; against calls the reward is 0 (no calls),
    # against a text reference 0 too (the answer mentions <tool_call>: no reply).
    unclosed = '<think>a</think><tool_call>{"name": "ping", "arguments": {}}' + EOT
    assert released(unclosed, ping, TOOLS) == 0.0
    # Two calls, the second unclosed: 1 exact / (1 predicted + 1 reference left) = 0.5.
    two = call_reference(("ping", {}), ("f", {"a": "x"}))
    partial = ('<think>a</think><tool_call>{"name": "ping", "arguments": {}}</tool_call>'
               '<tool_call>{"name": "f", "arguments": {"a": "x"}}' + EOT)
    assert released(partial, two, TOOLS) == 0.5
    # An extra <think> opening inside the block is one non-greedy match: fine.
    extra_open = render([("ping", {})]).replace("<think>", "<think>\n<think>") + EOT
    assert released(extra_open, ping, TOOLS) == 1.0
    # Two think blocks, or none closed: -1.
    assert released("<think>a</think><think>b</think>" + EOT, ping, TOOLS) == -1.0
    assert released("<think>a" + EOT, ping, TOOLS) == -1.0
    # Extra keys in the call JSON are ignored; a duplicated "arguments" keeps the last.
    extra = '<think>a</think><tool_call>{"name": "ping", "arguments": {}, "id": 1}</tool_call>'
    assert released(extra + EOT, ping, TOOLS) == 1.0
    dup = ('<think>a</think><tool_call>{"name": "f", "arguments": {"b": 1}, '
           '"arguments": {"a": "x"}}</tool_call>' + EOT)
    assert released(dup, call_reference(("f", {"a": "x"})), TOOLS) == 1.0
    # Unknown tool or undeclared argument: -1; broken JSON: -1.
    assert released(render([("nope", {})]), ping, TOOLS) == -1.0
    assert released(render([("f", {"x": 1})]), ping, TOOLS) == -1.0
    assert released('<think>a</think><tool_call>{nope}</tool_call>', ping, TOOLS) == -1.0
    # Text before <think> is allowed; " hi" vs label reply "hi<|im_end|>": tokens [hi] vs
    # [hi, im, end], P 1, R 1/3 -> F 0.5.
    assert released("preamble <think>a</think> hi", text_reference("hi"), TOOLS) == 0.5


def test_released_values_by_hand():
    def score(predicted, reference, key="d"):
        return released(render([("f", {key: predicted})]) + EOT,
                        call_reference(("f", {key: reference})), TOOLS)

    assert score(True, 1) == 1.0                    # int/float/bool: one numeric class
    assert score(1, 1.0) == 1.0
    assert score(math.nan, math.nan) == 0.0         # NaN == NaN is False
    assert score([2.0, 4.0], [2, 4]) == 0.0         # "[2.0, 4.0]" != "[2, 4]"
    assert score({"p": 1, "q": 2}, {"q": 2, "p": 1}) == 0.0  # str() keeps key order
    assert score({"p": 1, "q": 2}, {"p": 1, "q": 2}) == 1.0
    assert score("10000.0", 10000.0) == 1.0         # str(10000.0) == "10000.0"
    assert score("10000", 10000.0) == 0.0
    assert score("True", True) == 1.0               # str(True) == "True"
    assert score("true", True) == 0.0
    assert score(None, "None") == 1.0
    assert score(" x", "x") == 1.0                  # not equal, not blank: ROUGE-L F = 1
    assert score("", "") == 1.0 and score(" ", "x") == 0.0


def test_released_text_replies_by_hand():
    # A reference of 23 words: its label reply has 25 ROUGE tokens (+ "im", "end").
    words = "the requested tools cannot do this so please share more details about what " \
            "you want and when you want it done today okay"
    assert len(words.split()) == 23
    reference = text_reference(words)
    # "No.<|im_end|>": tokens [no, im, end]; LCS 2 (im end): P 2/3, R 2/25 -> F 4/28 = 0.143.
    assert released("<think>a</think>No." + EOT, reference, TOOLS) == pytest.approx(1 / 7)
    # Empty reply: the answer is "<|im_end|>": [im, end]: P 1, R 2/25 -> F 4/27 = 0.148.
    assert released("<think>a</think>\n\n" + EOT, reference, TOOLS) == pytest.approx(4 / 27)
    assert released("<think>a</think>抱歉。" + EOT, reference, TOOLS) == pytest.approx(4 / 27)
    # Identical with the end token: 1; without it (cut at max tokens) ROUGE on 23 of 25.
    assert released("<think>a</think>" + words + EOT, reference, TOOLS) == 1.0
    assert released("<think>a</think>" + words, reference, TOOLS) == pytest.approx(46 / 48)
    # A reply with no text at all after </think> (no end token either): 0.
    assert released("<think>a</think>  ", reference, TOOLS) == 0.0
    # Calls against a text reference: 0.
    assert released(render([("ping", {})]) + EOT, reference, TOOLS) == 0.0


def test_released_repeated_tool_name_keeps_the_last_spec():
    tools = [{"name": "search", "parameters": {"q": {"type": "str"}}},
             {"name": "search", "parameters": {"type": "object", "properties": {"regex": {}}}}]
    reference = call_reference(("search", {"regex": "x"}))
    assert released(render([("search", {"regex": "x"})]), reference, tools) == 1.0
    assert released(render([("search", {"q": "x"})]), reference, tools) == -1.0
    # A JSON-schema without "type" declares its own keys (the released rule).
    untyped = [{"name": "u", "parameters": {"properties": {"k": {}}}}]
    assert released(render([("u", {"k": 1})]), call_reference(("u", {"k": 1})), untyped) == -1.0
    assert released(render([("u", {})]), call_reference(("u", {})), untyped) == 1.0


def test_released_bad_inputs_raise():
    ok = render([("ping", {})])
    with pytest.raises(ValueError, match="response"):
        released(None, call_reference(("ping", {})), TOOLS)
    with pytest.raises(ValueError, match="reference"):
        released(ok, {"role": "user", "content": "hi"}, TOOLS)
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        released(ok, call_reference(("ping", {})), [{"description": "no name"}])


def test_group_advantages_released_epsilon():
    # [1, 0, 0, 0]: mean 1/4, sample std 0.5 (see above): (1 - 1/4) / (0.5 + 1e-9).
    assert group_advantages([1, 0, 0, 0], 4)[0] == 0.75 / (0.5 + 1e-9)
    assert group_advantages([0.5, 0.5], 2) == [0.0, 0.0]


def test_keep_group_released_scores_malformed_as_zero():
    # Rewards [-1] * 7 + [1]: the reward mean is -0.75, the score mean 0.125: kept.
    assert keep_group([-1.0] * 7 + [1.0])
    assert not keep_group([-1.0] * 7 + [1.0], rule="reward_mean")
    # Scores all 0 (malformed and wrong): mean 0, dropped.
    assert not keep_group([-1.0, 0.0, -1.0, 0.0])
    # Same score everywhere: max == min, dropped even with the mean inside.
    assert not keep_group([0.5] * 8)
    assert keep_group([0.5] * 7 + [0.6])
    # min_diff: the spread must exceed it.
    assert not keep_group([0.4, 0.6], min_diff=0.2 + 1e-6)
