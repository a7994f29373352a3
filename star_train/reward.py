"""The Sim-RL reward of STAR (see shared/STAR.md, "Sim-RL"), plus GRPO group helpers.

Response format. ``response`` is the assistant text *including* its opening
``<think>``: the rollout prompt ends with ``<think>\\n`` (generation prompt then
``<think>``), so the rollout code prepends that to the sampled text before scoring.
After the think block come either ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (whitespace and newlines around the JSON allowed) or a text reply. One
trailing ``<|im_end|>`` / ``<|endoftext|>`` (and whitespace) is stripped.

Rule decisions beyond STAR.md's text:

* Format. Only whitespace may precede ``<think>``; exactly one ``<think>`` and one
  ``</think>``, in that order. Tool-call tags must pair up without nesting. Text
  around tool-call blocks is allowed (Qwen3's template puts content before the
  calls), kept in ``reply`` and ignored when scoring calls.
* A call's JSON must be an object with exactly the keys ``name`` (non-empty string)
  and ``arguments`` (an object), without duplicate keys and without NaN/Infinity.
  Anything else counts as unparseable (-1): it is not what the template renders.
* Validity (-1 for an unknown tool or undeclared argument) is checked before
  looking at the reference, so an invalid call scores -1 against a text reference too.
  A tool name listed twice with different schemas (it happens in the example data)
  accepts a call whose arguments all fit one of those schemas.
* Text similarity (replies and string arguments): 1 if the two strings are
  identical after stripping surrounding whitespace, else 0 if either is empty after
  stripping (so a whitespace-only reply scores 0 against a non-empty reference),
  else ROUGE-L F with stemming. rouge_score's tokenizer lowercases and keeps only
  ASCII letters and digits, so text without any (e.g. Chinese, or punctuation)
  scores 0 unless identical.
* Reference: ``tool_calls`` non-empty means a tool-call reference and its
  ``content`` is ignored; otherwise ``content`` (None counts as "") is the text.
  Reference arguments may be a dict or a JSON string holding an object
  (missing, None or a blank string: no arguments).
* Two calls with no arguments on either side have argument similarity 1 (the
  formula's 0/0; the call is exactly right).
* Values: two strings -> text similarity; two bools -> equality; two numbers
  (int/float, not bool) -> numeric equality, so 1 and 1.0 match; anything else,
  including nested lists/dicts and mixed types, -> equality of canonical string
  forms: a string is itself, any other value is its JSON text with sorted keys and
  integral floats written as ints. So {"a": 1, "b": 2} matches {"b": 2, "a": 1.0},
  list order matters, nested values earn all or nothing, "5" matches 5, and 1
  never matches True ("1" vs "true").
* Greedy matching follows STAR.md literally: a predicted call is matched to the
  best remaining same-name reference call even when that similarity is 0 (ties go
  to the earlier reference call). The result can depend on the order of predicted
  calls that share a name; with distinct names it does not.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from .chat.qwen3 import ParsedResponse, parse_response  # noqa: F401  (ParsedResponse: public)
from .data.tools import call_is_declared, tools_by_name

INVALID_REWARD = -1.0

# ---------------------------------------------------------------- similarities

@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it pulls in nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def text_similarity(predicted: str, reference: str) -> float:
    """1 if identical (stripped), 0 if either is blank, else ROUGE-L F with stemming."""
    predicted, reference = predicted.strip(), reference.strip()
    if predicted == reference:
        return 1.0
    if not predicted or not reference:
        return 0.0
    return _rouge_scorer().score(reference, predicted)["rougeL"].fmeasure


def _canonical(value: Any) -> Any:
    # Integral floats become ints so that nested 1.0 and 1 agree, as top-level ones do.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def _string_form(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(_canonical(value), sort_keys=True, ensure_ascii=False)


def _is_number(value: Any) -> bool:
    # bool is a subclass of int; True must not count as the number 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_similarity(predicted: Any, reference: Any) -> float:
    """Similarity in [0, 1] of one argument's predicted and reference values."""
    if isinstance(predicted, str) and isinstance(reference, str):
        return text_similarity(predicted, reference)
    if isinstance(predicted, bool) and isinstance(reference, bool):
        return float(predicted == reference)
    if _is_number(predicted) and _is_number(reference):
        return float(predicted == reference)
    return float(_string_form(predicted) == _string_form(reference))


def argument_similarity(predicted: dict, reference: dict) -> float:
    """Sum of shared-key value similarities / (#predicted keys + #reference-only keys)."""
    denominator = len(predicted) + len(reference.keys() - predicted.keys())
    if denominator == 0:
        return 1.0  # both calls take no arguments: nothing differs
    shared = predicted.keys() & reference.keys()
    return sum(value_similarity(predicted[key], reference[key]) for key in shared) / denominator


def tool_call_similarity(predicted_calls: list[dict], reference_calls: list[dict]) -> float:
    """Greedy per-name matching credit / (#predicted + #reference calls left unmatched)."""
    unmatched = list(reference_calls)
    credit = 0.0
    for call in predicted_calls:
        candidates = [ref for ref in unmatched if ref["name"] == call["name"]]
        if not candidates:
            continue
        scores = [argument_similarity(call["arguments"], ref["arguments"]) for ref in candidates]
        best = max(range(len(candidates)), key=scores.__getitem__)  # first of equal maxima
        credit += scores[best]
        unmatched.remove(candidates[best])
    denominator = len(predicted_calls) + len(unmatched)
    return credit / denominator if denominator else 0.0


# ---------------------------------------------------------------- the reward

def _reference_call(call: Any, position: int) -> dict:
    where = f"reference['tool_calls'][{position}]"
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a dict")
    if "name" not in call and isinstance(call.get("function"), dict):
        call = call["function"]
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} needs a non-empty string 'name'")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: arguments string is not JSON ({error})") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: arguments must be an object (dict or JSON string)")
    return {"name": name, "arguments": arguments}


def reference_target(reference: Any) -> tuple[list[dict] | None, str]:
    """(tool calls or None, text) of a STAR record's last assistant message."""
    if not isinstance(reference, dict):
        raise ValueError(f"reference must be a dict (the last assistant message), "
                         f"got {type(reference).__name__}")
    role = reference.get("role", "assistant")
    if role != "assistant":
        raise ValueError(f"reference must be an assistant message, got role {role!r}")
    content = reference.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"reference['content'] must be a str or None, got {type(content).__name__}")
    raw_calls = reference.get("tool_calls")
    if raw_calls is None or raw_calls == []:
        return None, content
    if not isinstance(raw_calls, list):
        raise ValueError("reference['tool_calls'] must be a list or None")
    return [_reference_call(call, i) for i, call in enumerate(raw_calls)], content


def similarity_reward(response: str, reference: dict, tools: list) -> float:
    """STAR's Sim-RL reward of one completion: -1 if invalid, else in [0, 1]."""
    reference_calls, reference_text = reference_target(reference)
    tool_index = tools_by_name(tools)
    parsed = parse_response(response)
    if parsed.error is not None:
        return INVALID_REWARD
    predicted_calls = parsed.tool_calls or []
    for call in predicted_calls:
        if not call_is_declared(tool_index, call["name"], call["arguments"]):
            return INVALID_REWARD
    if reference_calls is None:
        return 0.0 if predicted_calls else text_similarity(parsed.reply, reference_text)
    if not predicted_calls:
        return 0.0
    return tool_call_similarity(predicted_calls, reference_calls)


# ---------------------------------------------------------------- GRPO groups

def _finite_rewards(rewards: Any) -> list[float]:
    try:
        values = [float(r) for r in rewards]
    except (TypeError, ValueError):
        raise ValueError("rewards must be a sequence of numbers") from None
    if not values:
        raise ValueError("rewards must not be empty")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("rewards must be finite")
    return values


def group_advantages(rewards, group_size: int, eps: float = 1e-6) -> list[float]:
    """(r - group mean) / (group std + eps) for consecutive groups of ``group_size``.

    The std is the sample std (n - 1 denominator): ``torch.std``'s default, which is
    what common GRPO code computes (e.g. TRL's GRPOTrainer), so advantages agree with
    those implementations. It needs ``group_size >= 2``. A group of equal rewards
    gets all-zero advantages (eps keeps the division finite).
    """
    values = _finite_rewards(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if len(values) % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {len(values)} rewards")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    advantages = []
    for start in range(0, len(values), group_size):
        group = values[start:start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        advantages.extend((r - mean) / (std + eps) for r in group)
    return advantages


def keep_group(rewards) -> bool:
    """Dynamic filter: keep a prompt group only if its mean reward is strictly in (0.01, 0.99)."""
    values = _finite_rewards(rewards)
    mean = sum(values) / len(values)
    return 0.01 < mean < 0.99
