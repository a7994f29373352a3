"""The Sim-RL reward of STAR (see shared/STAR.md, "Sim-RL"), plus GRPO group helpers.

(Over 400 lines on purpose: the released rules and our stricter ones stand side by side
in one module, so that each difference between them can be read in one place.)

Two rule sets, chosen by ``similarity_reward(..., rules=...)``:

``"released"`` (the default) computes what the released ``simrl.py`` of
github.com/Qwen-Applications/STAR computes, on the same strings:

* The response is the text as generated, from ``<think>`` on, end-of-turn token
  included (the released code splits the decoded query at the last
  ``<|im_start|>assistant\n``; so do we). The reference is rendered as the released
  label: the Qwen3 template's rendering of the last message alone, header removed,
  ``</think>`` put in front (``messages_to_trainset.py``). A text reference's reply is
  therefore ``content<|im_end|>``, and so is a finished text response's.
* Format: exactly one non-greedy ``<think>(.*?)</think>`` match (an extra ``<think>``
  opening inside it is fine); the answer is what follows the last ``</think>``. When
  the answer contains ``<tool_call>``, the calls are the complete
  ``<tool_call>(.*?)</tool_call>`` blocks (an unclosed one is not found), each
  ``json.loads`` (NaN allowed, a duplicated key keeps its last value) and read for
  ``name`` and ``arguments`` (other keys ignored); there is then no reply.
* Validity (-1): a call to a tool not in the list (a repeated name keeps its last
  spec) or an argument the tool does not declare (the spec's ``properties`` when it
  has a ``type`` and a ``properties`` dict, else the spec's own keys).
* Values: two strings -> 1 if equal, 0 if either is blank, else ROUGE-L F (stemmed);
  two of int/float/bool -> ``==`` (so ``True`` matches ``1``, NaN matches nothing);
  anything else -> ``str(p) == str(r)`` (so ``[2.0, 4.0]`` is not ``[2, 4]``, nested
  dicts compare in key order, and ``"10000.0"`` matches ``10000.0``).
* Argument similarity: sum over shared keys / (predicted keys + reference keys not
  predicted), 1 when both are empty. Calls: for each predicted call, the best (first of
  equal maxima) still-unmatched reference call of the same name is credited and
  removed; total / (predicted calls + reference calls left).
* Text reference: 0 when the model calls tools or has no reply, else the text rule.
* Where the released code raises after the format check (arguments that are a list
  or a string which still passed the declaration check), we return -1.

``"strict"`` is this project's earlier rule set, kept as an option (see
``strict_similarity_reward``): one trailing end token stripped, exactly one
``<think>`` and one ``</think>``, balanced tool-call tags, a call JSON with exactly
``name`` and ``arguments`` and no duplicate keys or NaN, booleans apart from numbers,
nested values compared as canonical JSON (key order and 1.0 vs 1 ignored), a repeated
tool name accepting a call that fits any of its specs.

Rule decisions of the strict set:

* Format. Only whitespace may precede ``<think>``; exactly one ``<think>`` and one
  ``</think>``, in that order. Tool-call tags must pair up without nesting. Text
  around tool-call blocks is allowed (Qwen3's template puts content before the
  calls), kept in ``reply`` and ignored when scoring calls.
* A call's JSON must be an object with exactly the keys ``name`` (non-empty string)
  and ``arguments`` (an object), without duplicate keys and without NaN/Infinity.
* Validity (-1 for an unknown tool or undeclared argument) is checked before
  looking at the reference, so an invalid call scores -1 against a text reference too.
* Text similarity (replies and string arguments): 1 if the two strings are
  identical after stripping surrounding whitespace, else 0 if either is empty after
  stripping, else ROUGE-L F with stemming. rouge_score's tokenizer lowercases and keeps
  only ASCII letters and digits, so text without any scores 0 unless identical.
* Values: two strings -> text similarity; two bools -> equality; two numbers
  (int/float, not bool) -> numeric equality; anything else -> equality of canonical
  string forms (a string is itself, any other value its JSON text with sorted keys and
  integral floats written as ints).

Both sets: the reference's ``tool_calls`` non-empty means a tool-call reference (its
``content`` ignored); two calls with no arguments on either side have argument
similarity 1; greedy matching credits the best remaining same-name reference call even
when that similarity is 0.

Other tool-call formats (``similarity_reward(..., fmt=...)``, see ``chat.templates``): the
rules above are about calls, not about how they are spelled. A response in another format
(Llama 3.1 JSON, or a model template without a think block) is parsed by that format
(malformed in it: -1) and the chosen rule set scores the parsed calls and reply
(``released_parsed_reward``, ``strict_parsed_reward``): validity, then call or text
similarity, exactly as above. A reply is the format's reply, whatever it contains (a
``<tool_call>`` in a Llama 3.1 reply is text, not a call); under the released rules it is
read with the end-of-turn token when the model wrote one, as the released code reads a
Qwen3 reply.
"""


from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from .chat.formats import split_end
from .chat.qwen3 import (  # noqa: F401  (ParsedResponse: public)
    ASSISTANT_HEADER,
    CALL_OPEN,
    END_OF_TURN,
    THINK_CLOSE_TAG,
    THINK_OPEN_TAG,
    ParsedResponse,
    parse_response,
)
from .data.tools import call_is_declared, tools_by_name

INVALID_REWARD = -1.0
RULES = ("released", "strict")
DEFAULT_RULES = "released"

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


def strict_similarity_reward(response: str, reference: dict, tools: list) -> float:
    """The ``"strict"`` rule set (see the module doc): -1 if invalid, else in [0, 1]."""
    return strict_parsed_reward(parse_response(response), reference, tools)


def strict_parsed_reward(parsed: ParsedResponse, reference: dict, tools: list) -> float:
    """The ``"strict"`` rules on a parsed response (any tool-call format's parse)."""
    reference_calls, reference_text = reference_target(reference)
    tool_index = tools_by_name(tools)
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


# ---------------------------------------------------------------- the released rules

_THINK_BLOCK = re.compile(re.escape(THINK_OPEN_TAG) + r"(.*?)" + re.escape(THINK_CLOSE_TAG),
                          re.DOTALL)
_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ReleasedAnswer:
    """A response or label read the released way: the think text, the calls found (each
    ``{"name", "arguments"}`` exactly as decoded), and the reply (None when the answer
    mentions ``<tool_call>``)."""

    think: str
    calls: list
    reply: str | None


def _released_answer(answer: str) -> tuple[list, str | None]:
    if CALL_OPEN not in answer:
        return [], answer
    calls = []
    for block in _CALL_BLOCK.findall(answer):
        decoded = json.loads(block)  # a JSONDecodeError is a ValueError
        try:
            calls.append({"name": decoded["name"], "arguments": decoded["arguments"]})
        except (KeyError, TypeError, IndexError):
            raise ValueError("a tool call without name or arguments") from None
    return calls, None


def released_parse(text: str, *, open_think: bool = False) -> ReleasedAnswer:
    """Read a generation as the released ``parse_generation``; ValueError when malformed.

    ``open_think``: put ``<think>`` in front when the text has none, as the released
    ``teacher_rollout.py`` does (its prompt leaves the opening to the teacher)."""
    if open_think and THINK_OPEN_TAG not in text:
        text = THINK_OPEN_TAG + text
    thinks = _THINK_BLOCK.findall(text)
    if len(thinks) != 1:
        raise ValueError(f"expected one think block, found {len(thinks)}")
    calls, reply = _released_answer(text.split(THINK_CLOSE_TAG)[-1].strip())
    return ReleasedAnswer(thinks[0].strip(), calls, reply)


def _label_call(call: dict) -> str:
    if call.get("function"):
        call = call["function"]
    arguments = call.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{call.get("name")}", "arguments": {text}}}\n</tool_call>'


def released_label(reference: dict) -> str:
    """The released training label of an assistant message (``messages_to_trainset.py``
    without reasoning): the Qwen3 template's rendering of that message alone (no think
    block: no user query precedes it), header removed, ``</think>`` in front."""
    content = reference.get("content")
    content = content if isinstance(content, str) else ""
    if not isinstance(reference.get("reasoning_content"), str) and THINK_CLOSE_TAG in content:
        content = content.split(THINK_CLOSE_TAG)[-1].lstrip("\n")
    text = ASSISTANT_HEADER + content
    for position, call in enumerate(reference.get("tool_calls") or []):
        text += ("\n" if position or content else "") + _label_call(call)
    label = (text + END_OF_TURN + "\n").replace(ASSISTANT_HEADER, "")
    if label.startswith(THINK_OPEN_TAG):
        label = label[len(THINK_OPEN_TAG):]
    return label if THINK_CLOSE_TAG in label else THINK_CLOSE_TAG + label


def released_reference(reference: dict) -> tuple[list | None, str | None]:
    """(calls, None) or (None, reply) of the released label; ValueError naming the
    reference when the label cannot be read (the released code raises there too)."""
    reference_target(reference)  # shape checks, with messages naming the field
    label = released_label(reference)
    parts = label.split(THINK_CLOSE_TAG)
    if len(parts) != 2:
        raise ValueError(f"reference: its label has {len(parts) - 1} {THINK_CLOSE_TAG}")
    try:
        calls, reply = _released_answer(parts[1].strip())
    except ValueError as error:
        raise ValueError(f"reference: a tool call of its label is unreadable ({error})") from None
    for call in calls:
        if not isinstance(call["arguments"], dict):
            raise ValueError("reference: tool call arguments must be an object")
    if calls:
        return calls, None
    if reply is None:  # the released code fails on such a label when the model replies
        raise ValueError("reference: its label mentions <tool_call> but holds no call")
    return None, reply


def released_tool_table(tools: list) -> dict:
    """Tool name -> declared parameters as the released ``extract_tools_from_prompt``
    reads them: a spec with a ``type`` and a ``properties`` dict declares its properties,
    any other spec its own keys; a repeated name keeps its last spec. (The OpenAI
    wrapping is unwrapped as ``teacher_rollout.py`` does; missing parameters: none.)"""
    table = {}
    for tool in tools:
        if "type" in tool and "function" in tool:
            tool = tool["function"]
        parameters = tool.get("parameters")
        if parameters is None:
            parameters = {}
        if (isinstance(parameters, dict) and isinstance(parameters.get("properties"), dict)
                and parameters.get("type") is not None):
            parameters = parameters["properties"]
        table[tool["name"]] = parameters
    return table


def released_calls_valid(calls: list, table: dict) -> bool:
    """Every call names a tool of ``table`` and passes only declared arguments."""
    try:
        for call in calls:
            if call["name"] not in table:
                return False
            declared = table[call["name"]]
            if any(key not in declared for key in call["arguments"]):
                return False
    except Exception:  # unhashable names, arguments that are numbers or None: invalid
        return False
    return True


def released_text_similarity(predicted: str, reference: str) -> float:
    """1 if identical (not stripped), 0 if either is blank, else ROUGE-L F (stemmed)."""
    if predicted == reference:
        return 1.0
    if not reference.strip() or not predicted.strip():
        return 0.0
    return _rouge_scorer().score(reference, predicted)["rougeL"].fmeasure


def released_value_similarity(predicted: Any, reference: Any) -> float:
    if isinstance(predicted, str) and isinstance(reference, str):
        return released_text_similarity(predicted, reference)
    scalar = (int, float, bool)
    if isinstance(predicted, scalar) and isinstance(reference, scalar):
        return float(predicted == reference)
    return float(str(predicted) == str(reference))


def released_argument_similarity(predicted, reference: dict) -> float:
    left = dict(reference)
    total = 0.0
    for key in predicted:
        if key in left:
            total += released_value_similarity(predicted[key], left.pop(key))
    union = len(predicted) + len(left)
    return total / union if union > 0 else 1.0


def released_call_similarity(predicted_calls: list, reference_calls: list) -> float:
    buckets: dict = {}
    for call in reference_calls:
        buckets.setdefault(call["name"], []).append(call["arguments"])
    credit = 0.0
    for call in predicted_calls:
        bucket = buckets.get(call["name"])
        if not bucket:
            continue
        best, best_at = -1.0, 0
        for position, arguments in enumerate(bucket):
            similarity = released_argument_similarity(call["arguments"], arguments)
            if similarity > best:
                best, best_at = similarity, position
        bucket.pop(best_at)
        credit += best
    union = sum(len(bucket) for bucket in buckets.values()) + len(predicted_calls)
    return credit / union if union > 0 else 1.0


def released_similarity_reward(response: str, reference: dict, tools: list) -> float:
    """The ``"released"`` rule set (see the module doc): -1 if invalid, else in [0, 1]."""
    if not isinstance(response, str):
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    tools_by_name(tools)  # the spec checks, with messages naming the position
    reference_calls, reference_reply = released_reference(reference)
    try:
        parsed = released_parse(response.split(ASSISTANT_HEADER)[-1])
    except ValueError:
        return INVALID_REWARD
    return _released_score(parsed.calls, parsed.reply, reference_calls, reference_reply, tools)


def _released_score(calls: list, reply: str | None, reference_calls, reference_reply,
                    tools: list) -> float:
    """The released rules after the format check: validity, then calls or the reply
    (None when the answer has calls) against the reference label's."""
    if not released_calls_valid(calls, released_tool_table(tools)):
        return INVALID_REWARD
    if reference_calls:
        if not calls:
            return 0.0
        try:
            return float(released_call_similarity(calls, reference_calls))
        except Exception:  # the released code raises here (e.g. list arguments)
            return INVALID_REWARD
    if not reply:
        return 0.0
    return float(released_text_similarity(reply, reference_reply))


def released_parsed_reward(parsed: ParsedResponse, ended: bool, reference: dict,
                           tools: list) -> float:
    """The ``"released"`` rules on a response parsed by another tool-call format
    (``ended``: the model wrote its end-of-turn token). The released code reads the reply
    as the text after ``</think>`` with the end token (``"reply<|im_end|>"``, as the
    reference label reads); so is it here."""
    tools_by_name(tools)
    reference_calls, reference_reply = released_reference(reference)
    if parsed.error is not None:
        return INVALID_REWARD
    calls = parsed.tool_calls or []
    reply = None if calls else parsed.reply + (END_OF_TURN if ended else "")
    return _released_score(calls, reply, reference_calls, reference_reply, tools)


def similarity_reward(response: str, reference: dict, tools: list, *,
                      rules: str = DEFAULT_RULES, fmt=None) -> float:
    """STAR's Sim-RL reward of one completion: -1 if invalid, else in [0, 1].

    ``response``: the generated text from ``<think>`` on (end-of-turn token included);
    ``reference``: the record's last (assistant) message; ``rules``: ``"released"``
    (the released ``simrl.py``) or ``"strict"`` (see the module doc).
    ``fmt``: the chat format the response is written in (a ``chat.templates.ChatRenderer``,
    or a tool-call format's name for the Qwen3 layout; its ``full_response`` of a
    completion is the ``response``). None, or the Qwen3 format itself, scores the text as
    written. Another format's response is parsed with that format (-1 when malformed in
    it) and its calls, reasoning and reply are scored by ``rules``.
    """
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    renderer = None if fmt is None else _renderer(fmt)
    if renderer is not None and not renderer.native:
        if not isinstance(response, str):
            raise ValueError(f"response must be a str, got {type(response).__name__}")
        parsed = renderer.parse(response)
        if rules == "strict":
            return strict_parsed_reward(parsed, reference, tools)
        return released_parsed_reward(parsed, split_end(response)[1], reference, tools)
    if rules == "released":
        return released_similarity_reward(response, reference, tools)
    return strict_similarity_reward(response, reference, tools)


def _renderer(fmt):
    from .chat.templates import ChatRenderer, chat_renderer

    return fmt if isinstance(fmt, ChatRenderer) else chat_renderer(fmt=fmt, template="qwen3")


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


def group_advantages(rewards, group_size: int, eps: float = 1e-9) -> list[float]:
    """(r - group mean) / (group std + eps) for consecutive groups of ``group_size``.

    As released (OpenRLHF's ``group_norm`` advantage estimator): the std is the sample
    std (n - 1 denominator, ``torch.std``'s default) and eps is 1e-9. It needs
    ``group_size >= 2``. A group of equal rewards gets all-zero advantages.
    The rewards are the rewards (-1 for a malformed answer), not the filter's scores.
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


FILTERS = ("released", "reward_mean")


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def filter_score(reward: float) -> float:
    """The released per-sample *score* the dynamic filter reads: 0 for a malformed
    answer (reward -1), else the reward, rounded to float32 as the released tensor is."""
    return 0.0 if reward == INVALID_REWARD else _float32(reward)


def keep_group(rewards, *, rule: str = "released", low: float = 0.01, high: float = 0.99,
               min_diff: float = 0.0) -> bool:
    """Dynamic filter of one prompt group, given its rewards (-1 = malformed).

    ``"released"`` (OpenRLHF's ``--dynamic_filtering`` as STAR patched and ran it, range
    0.01 0.99, min diff 0): on the scores (``filter_score``), keep when
    ``low + 1e-6 < mean < high - 1e-6`` and ``max - min > min_diff``.
    ``"reward_mean"`` (this project's earlier rule): keep when ``low < mean reward < high``.
    """
    values = _finite_rewards(rewards)
    if rule == "reward_mean":
        return low < sum(values) / len(values) < high
    if rule != "released":
        raise ValueError(f"rule must be one of {FILTERS}, got {rule!r}")
    scores = [filter_score(v) for v in values]
    mean = sum(scores) / len(scores)
    return low + 1e-6 < mean < high - 1e-6 and max(scores) - min(scores) > min_diff
