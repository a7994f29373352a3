"""The ``"released"`` reward rules against an oracle of the released ``simrl.py``.

The oracle below re-states the released reward (github.com/Qwen-Applications/STAR,
``simrl.py``: ``reward_func`` and its helpers) on the released pipeline's own strings:
the prompt and the label are rendered with the Qwen3 chat template itself (jinja, through
transformers, as ``messages_to_trainset.py`` does), the tools are read back from the
prompt's ``<tools>`` block, and the generation is cut from the query at the last
assistant header. It shares no code with ``star_train.reward``.

About 24 perturbations of each of the 1024 shared rows (plus a text-reference variant of
each row) are scored by both; every value must be equal. Where the released code raises
while scoring (it would stop the run), ours gives -1.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from star_train.reward import similarity_reward

DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "star_example_messages.jsonl"
TEMPLATE_FILE = DATA_FILE.parent / "qwen3_chat_template.jinja"
EOT = "<|im_end|>"


# ------------------------------------------------------------------ the oracle

class OracleCrash(Exception):
    """The released code would raise here (outside its try blocks)."""


def _template():
    if not TEMPLATE_FILE.exists():
        pytest.skip(f"chat template not found at {TEMPLATE_FILE}")
    return TEMPLATE_FILE.read_text()


def render(messages, tools=None, generation_prompt=False):
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(conversations=[messages], tools=tools,
                                     chat_template=_template(),
                                     add_generation_prompt=generation_prompt)
    return texts[0]


def oracle_label(message):
    """messages_to_trainset.py without --add-reasoning-content. (This template version reads
    ``content`` unguarded; Qwen3-8B's guards it and renders None as "": the same text.)"""
    message = {**message, "content": message.get("content") or ""}
    text = render([message]).replace("<|im_start|>assistant\n", "")
    if text.startswith("<think>"):
        text = text[7:]
    return text if "</think>" in text else "</think>" + text


def oracle_prompt(record):
    return render(record["messages"][:-1], record["tools"], generation_prompt=True) + "<think>"


def _calls_of(answer):
    found = []
    for block in re.findall(r"<tool_call>(.*?)</tool_call>", answer, re.S):
        obj = json.loads(block)
        found.append({"name": obj["name"], "arguments": obj["arguments"]})
    return found


def oracle_truth(label):
    think, answer = label.split("</think>")
    answer = answer.strip()
    if "<tool_call>" in answer:
        return _calls_of(answer), None
    return [], answer


def oracle_generation(text):
    if len(re.findall(r"<think>(.*?)</think>", text, re.S)) != 1:
        raise ValueError("think blocks")
    answer = text.split("</think>")[-1].strip()
    if "<tool_call>" in answer:
        return _calls_of(answer), None
    return [], answer


def oracle_tools(prompt):
    blocks = re.findall(r"<tools>(.*?)</tools>", prompt, re.S)
    if not blocks:
        return []
    table = {}
    for line in blocks[-1].split("\n"):
        if line.strip():
            spec = json.loads(line.strip())
            params = spec["parameters"]
            if ("properties" in params and isinstance(params["properties"], dict)
                    and params.get("type") is not None):
                params = params["properties"]
            table[spec["name"]] = params
    return table


def oracle_valid(calls, table):
    for call in calls:
        if call["name"] not in table:
            return False
        for key in call["arguments"]:
            if key not in table[call["name"]]:
                return False
    return True


def oracle_rouge(pred, ref):
    if pred == ref:
        return 1
    if ref.strip() == "" or pred.strip() == "":
        return 0
    return _scorer().score(ref, pred)["rougeL"].fmeasure


_SCORER = []


def _scorer():
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True))
    return _SCORER[0]


def oracle_args(ref_args, pred_args):
    ref_args = ref_args.copy()
    hit = 0
    for key in pred_args:
        if key in ref_args:
            r, p = ref_args.pop(key), pred_args[key]
            if isinstance(p, str) and isinstance(r, str):
                hit += oracle_rouge(p, r)
            elif isinstance(p, (int, float, bool)) and isinstance(r, (int, float, bool)):
                hit += 1 if p == r else 0
            else:
                hit += 1 if str(p) == str(r) else 0
    union = len(pred_args) + len(ref_args)
    return hit / union if union > 0 else 1


def oracle_calls(truth, predicted):
    buckets = {}
    for call in truth:
        buckets.setdefault(call["name"], []).append(call)
    hit = 0
    for call in predicted:
        bucket = buckets.get(call["name"], [])
        if not bucket:
            continue
        best, where = -1, 0
        for i, ref in enumerate(bucket):
            s = oracle_args(ref["arguments"], call["arguments"])
            if s > best:
                best, where = s, i
        bucket.pop(where)
        hit += best
    union = sum(len(b) for b in buckets.values()) + len(predicted)
    return hit / union if union > 0 else 1


def oracle_reward(query, prompt, label):
    truth_calls, truth_reply = oracle_truth(label)
    table = oracle_tools(prompt)
    generation = query.split("<|im_start|>assistant\n")[-1]
    try:
        calls, reply = oracle_generation(generation)
    except Exception:
        return -1
    try:
        if not oracle_valid(calls, table):
            return -1
    except Exception:
        return -1
    try:
        if truth_calls:
            return oracle_calls(truth_calls, calls) if calls else 0
        return oracle_rouge(reply, truth_reply) if reply else 0
    except Exception as error:
        raise OracleCrash(str(error)) from None


# ------------------------------------------------------------------ perturbations

def block(call, **extra):
    return "<tool_call>\n" + json.dumps({"name": call[0], "arguments": call[1], **extra}) \
        + "\n</tool_call>"


def answer(calls, eot=True, reasoning="Let me work this out."):
    body = "\n".join(block(c) for c in calls)
    return f"<think>\n{reasoning}\n</think>\n\n{body}" + (EOT if eot else "")


def _first_key(calls, kind):
    for i, (_, args) in enumerate(calls):
        for key, value in args.items():
            if kind(value):
                return i, key
    return None


def _with(calls, i, key, value):
    out = [(name, dict(args)) for name, args in calls]
    out[i][1][key] = value
    return out


def call_perturbations(record, rng):
    """Responses to a tool-call reference, by kind."""
    ref = record["messages"][-1]
    calls = [(c["name"], c["arguments"] if isinstance(c["arguments"], dict)
              else json.loads(c["arguments"])) for c in ref["tool_calls"]]
    names = [t["name"] for t in record["tools"]]
    cases = {
        "exact": answer(calls),
        "exact, no end token": answer(calls, eot=False),
        "drop first": answer(calls[1:]),
        "drop last": answer(calls[:-1]),
        "duplicate": answer(calls + calls[:1]),
        "reversed": answer(calls[::-1]),
        "unknown tool": answer(calls + [("no_such_tool", {})]),
        "other tool": answer([(rng.choice(names), {})]),
        "unclosed last": answer(calls).removesuffix(EOT).removesuffix("</tool_call>") + EOT,
        "unclosed only": "<think>\nx\n</think>\n\n<tool_call>\n" + json.dumps(
            {"name": calls[0][0], "arguments": calls[0][1]}) + EOT,
        "extra think opening": answer(calls).replace("<think>\n", "<think>\n<think>\n", 1),
        "two think blocks": "<think>\na\n</think>\n" + answer(calls),
        "no think close": answer(calls).replace("</think>", ""),
        "extra key": "<think>\nx\n</think>\n\n" + "\n".join(block(c, id=7) for c in calls) + EOT,
        "bad json": answer(calls).replace('"arguments": {', '"arguments": {,', 1),
        "text reply": "<think>\nx\n</think>\n\nNo." + EOT,
        "empty reply": "<think>\nx\n</think>\n\n" + EOT,
        "content then calls": answer(calls).replace("\n\n<tool_call>", "\n\nSure.\n<tool_call>", 1),
        "arguments empty list": answer([(calls[0][0], [])] + calls[1:]),
        "arguments null": answer([(calls[0][0], None)] + calls[1:]),
    }
    dup = calls[0]
    dup_json = json.dumps({"name": dup[0], "arguments": {"zz": 1}})[:-1] + \
        ', "arguments": ' + json.dumps(dup[1]) + "}"
    cases["duplicated arguments key"] = ("<think>\nx\n</think>\n\n<tool_call>\n" + dup_json
                                         + "\n</tool_call>" + EOT)
    spot = _first_key(calls, lambda v: isinstance(v, str))
    if spot:
        i, key = spot
        value = calls[i][1][key]
        cases["string + word"] = answer(_with(calls, i, key, value + " extra"))
        cases["string swapped"] = answer(_with(calls, i, key, "completely different"))
        cases["string padded"] = answer(_with(calls, i, key, " " + value))
        cases["string -> NaN"] = answer(_with(calls, i, key, math.nan))
        cases["string -> list"] = answer(_with(calls, i, key, [value]))
    spot = _first_key(calls, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if spot:
        i, key = spot
        value = calls[i][1][key]
        cases["number -> float"] = answer(_with(calls, i, key, float(value)))
        cases["number -> str"] = answer(_with(calls, i, key, str(value)))
        cases["number -> str(float)"] = answer(_with(calls, i, key, str(float(value))))
        cases["number -> True"] = answer(_with(calls, i, key, True))
        cases["number -> NaN"] = answer(_with(calls, i, key, math.nan))
        cases["number + 1"] = answer(_with(calls, i, key, value + 1))
    spot = _first_key(calls, lambda v: isinstance(v, list))
    if spot:
        i, key = spot
        value = calls[i][1][key]
        floats = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        cases["list -> floats"] = answer(_with(calls, i, key, floats))
        cases["list reversed"] = answer(_with(calls, i, key, value[::-1]))
        cases["list -> str"] = answer(_with(calls, i, key, str(value)))
    spot = _first_key(calls, lambda v: isinstance(v, bool))
    if spot:
        i, key = spot
        cases["bool -> int"] = answer(_with(calls, i, key, int(calls[i][1][key])))
        cases["bool -> str"] = answer(_with(calls, i, key, str(calls[i][1][key])))
    spot = _first_key(calls, lambda v: isinstance(v, dict) and len(v) > 1)
    if spot:
        i, key = spot
        cases["dict reordered"] = answer(_with(calls, i, key, dict(reversed(calls[i][1][key].items()))))
    spot = _first_key(calls, lambda v: True)
    if spot:
        i, key = spot
        dropped = [(n, dict(a)) for n, a in calls]
        del dropped[i][1][key]
        cases["drop argument"] = answer(dropped)
        cases["undeclared argument"] = answer(_with(calls, i, "not_a_param_zz", 1))
        cases["arguments list of keys"] = answer([(calls[i][0], [key])])
    return cases


def text_perturbations(record, rng):
    """A text-reference variant of the row (an irrelevance answer) and replies to it."""
    words = record["messages"][0]["content"].split()
    reference = {"role": "assistant", "content": "Sorry, I cannot help with: "
                 + " ".join(words[:rng.randint(3, 9)]), "tool_calls": None}
    reply = reference["content"]
    think = "<think>\nok\n</think>\n\n"
    cases = {
        "same": think + reply + EOT,
        "same, no end token": think + reply,
        "No.": think + "No." + EOT,
        "empty": think + EOT,
        "non-ASCII": think + "抱歉，我无法帮助。" + EOT,
        "prefix": think + " ".join(reply.split()[:4]) + EOT,
        "calls": answer([(record["tools"][0]["name"], {})]),
    }
    return reference, cases


def _rows():
    if not DATA_FILE.exists():
        pytest.skip(f"shared data not found at {DATA_FILE}")
    with DATA_FILE.open() as lines:
        return [json.loads(line) for line in lines]


def test_released_rules_match_the_oracle_on_perturbed_rows():
    rows = _rows()
    assert len(rows) == 1024
    checked = crashes = 0
    seen_kinds = set()
    values = []
    for index, record in enumerate(rows):
        rng = random.Random(index)
        prompt = oracle_prompt(record)
        text_reference, text_cases = text_perturbations(record, rng)
        groups = [(record["messages"][-1], call_perturbations(record, rng)),
                  (text_reference, text_cases)]
        for reference, cases in groups:
            label = oracle_label(reference)
            for kind, response in cases.items():
                query = prompt + response.removeprefix("<think>")
                try:
                    expected = oracle_reward(query, prompt, label)
                except OracleCrash:
                    expected, crashes = -1, crashes + 1
                got = similarity_reward(response, reference, record["tools"])
                assert got == expected, (record["id"], kind, response, got, expected)
                seen_kinds.add(kind)
                values.append(got)
                checked += 1
    assert checked > 24000, checked
    assert 0 < crashes <= len(rows), crashes  # "arguments list of keys", where it crashes
    assert len(seen_kinds) >= 40
    # The cases span the reward's range: malformed, zero, partial and exact.
    assert {-1, 0, 1} <= set(values) and sum(0 < v < 1 for v in values) > 5000
