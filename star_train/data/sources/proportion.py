"""Labels (``labeling_messages.py``) and stratified sampling (``data_proportion.py``).

Labels of an assistant message at position ``index``: ``tag`` holds "response" (content
neither None nor ""), "parallel" (more than one call) or "single" (one call), and
"multi-step" (calls right after a tool message); ``turns = (index + 1) // 2``;
``tool_call_num``. They are written into every assistant message of the record.

Sampling, on the last assistant message's labels: the category targets are
``int(rate * size)`` (single-turn vs multi-turn, parallel vs single, response,
multi-step); the records are shuffled (seeded), then taken greedily up to
``int(1.1 * size)`` while some category they belong to is under its target (more than
``max_turns`` turns: skipped; a response record once the response target is met:
skipped); those whose prompt is over ``max_prompt_tokens`` are dropped; and ``size`` of
the rest are drawn at random (all of them when fewer are left). One seeded generator
runs through shuffle and draw, as the released script's global ``random`` does.
"""

from __future__ import annotations

import json
import random


def label_record(record: dict) -> dict:
    """A copy of ``record`` with the labels in each assistant message."""
    messages = record.get("messages", [])
    labelled = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            labelled.append(message)
            continue
        tags = []
        if message.get("content") is not None and message.get("content") != "":
            tags.append("response")
        calls = message.get("tool_calls") or []
        if len(calls) > 1:
            tags.append("parallel")
        elif len(calls) == 1:
            tags.append("single")
        if index > 0 and messages[index - 1].get("role") == "tool" and calls:
            tags.append("multi-step")
        labelled.append({**message, "tag": tags, "turns": (index + 1) // 2,
                         "tool_call_num": len(calls)})
    return {**record, "messages": labelled}


CATEGORIES = ("single_turn", "multi_turn", "parallel", "single", "response", "multi_step")


def _last_assistant(record: dict) -> tuple[dict | None, int]:
    messages = record.get("messages", [])
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return messages[index], index
    return None, -1


def categories(record: dict) -> dict[str, bool]:
    """The categories of a labelled record (from its last assistant message)."""
    message, _ = _last_assistant(record)
    if message is None:
        return dict.fromkeys(CATEGORIES, False)
    turns, tags = message.get("turns", 0), message.get("tag", [])
    calls = len(message.get("tool_calls") or [])
    return {"single_turn": turns == 1, "multi_turn": turns > 1, "parallel": calls > 1,
            "single": calls == 1, "response": "response" in tags,
            "multi_step": "multi-step" in tags}


def estimated_prompt_tokens(record: dict) -> int:
    """The released estimate without a tokenizer: characters of the prompt's messages
    (+10 per role) and tools, divided by 3."""
    message, index = _last_assistant(record)
    prompt = record.get("messages", []) if index < 0 else record["messages"][:index]
    chars = 0
    for item in prompt:
        for key, value in item.items():
            if key == "role":
                chars += len(str(value)) + 10
            elif key in ("content", "reasoning_content") and value:
                chars += len(str(value))
            elif key == "tool_calls" and value:
                chars += len(json.dumps(value, ensure_ascii=False))
    if record.get("tools"):
        chars += len(json.dumps(record["tools"], ensure_ascii=False))
    return chars // 3


def prompt_messages(record: dict) -> list[dict]:
    """The messages before the last assistant message (all of them when there is none)."""
    _, index = _last_assistant(record)
    return record.get("messages", []) if index < 0 else record["messages"][:index]


def proportion_sample(records: list[dict], size: int, *, seed: int = 42, max_turns: int = 10,
                      response_rate: float = 0.2, multi_step_rate: float = 0.3,
                      single_turns_rate: float = 0.3, parallel_rate: float = 0.5,
                      max_prompt_tokens: int = 8192, count_tokens=estimated_prompt_tokens,
                      report: dict | None = None) -> list[dict]:
    """``data_proportion.py`` over labelled records; ``count_tokens(record)`` counts a
    record's prompt tokens. ``report`` (a dict) receives the targets and counts."""
    targets = {"single_turn": int(single_turns_rate * size),
               "multi_turn": int((1 - single_turns_rate) * size),
               "parallel": int(parallel_rate * size),
               "single": int((1 - parallel_rate) * size),
               "response": int(response_rate * size),
               "multi_step": int(multi_step_rate * size)}
    rng = random.Random(seed)
    pool = list(records)
    rng.shuffle(pool)
    counts = dict.fromkeys(targets, 0)
    sampled = []
    for record in pool:
        if len(sampled) >= int(size * 1.1):
            break
        found = categories(record)
        message, _ = _last_assistant(record)
        if message and message.get("turns", 0) > max_turns:
            continue
        if found["response"] and counts["response"] >= targets["response"]:
            continue
        if any(hit and counts[name] < targets[name] for name, hit in found.items()):
            sampled.append(record)
            for name, hit in found.items():
                counts[name] += hit
    fitting = [record for record in sampled if count_tokens(record) <= max_prompt_tokens]
    chosen = rng.sample(fitting, size) if len(fitting) >= size else fitting
    if report is not None:
        report.update({"targets": targets, "greedy_counts": counts, "greedy": len(sampled),
                       "within_prompt_tokens": len(fitting), "chosen": len(chosen)})
    return chosen
