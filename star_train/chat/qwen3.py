"""The Qwen3 chat format: its markers, a plain-Python renderer and the response parser.

The renderer reproduces the Qwen3 chat template (shared/data/qwen3_chat_template.jinja) as
transformers' ``apply_chat_template`` renders it, byte for byte, without jinja at run time.
``parse_response`` reads a completion in the same format back: the think block, the
``<tool_call>`` JSON blocks and the text reply. Every marker of the format is defined here
once; the rest of ``star_train`` imports them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN_TAG, THINK_CLOSE_TAG = "<think>", "</think>"
THINK_OPEN = THINK_OPEN_TAG + "\n"  # STAR prompts end with it: generation starts inside the think block
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
END_OF_TURN = "<|im_end|>"           # generation stops here
END_TOKENS = (END_OF_TURN, "<|endoftext|>")
ASSISTANT_HEADER = "<|im_start|>assistant\n"

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')


# ---------------------------------------------------------------- Qwen3 rendering

TOOL_STYLES = ("bare", "openai")


def render_chat(messages, tools=None, *, add_generation_prompt=False, enable_thinking=True,
                tool_style="bare"):
    """The Qwen3 chat template's text for `messages` (STAR-shaped dicts) and STAR `tools`.

    The template prints each tool with ``tojson`` exactly as it is handed over.
    ``tool_style="bare"`` (the default) hands over ``{name, description, parameters}`` as the
    released STAR data and BFCL's Qwen handler do; ``"openai"`` wraps each in
    ``{"type": "function", "function": ...}``, the shape Qwen's function-calling docs, vLLM
    and transformers' ``get_json_schema`` produce (what a deployed Qwen3 usually sees).
    """
    if not messages:
        raise ValueError("messages: empty conversation")
    if tool_style not in TOOL_STYLES:
        raise ValueError(f"tool_style: expected one of {TOOL_STYLES}, got {tool_style!r}")
    parts = [_render_system_and_tools(messages, tools, tool_style)]
    last_query = _last_query_index(messages)
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "user" or (role == "system" and index > 0):
            parts.append(f"<|im_start|>{role}\n{message['content']}<|im_end|>\n")
        elif role == "assistant":
            parts.append(render_assistant(message, index > last_query, index == len(messages) - 1))
        elif role == "tool":
            previous_role = messages[index - 1]["role"] if index > 0 else None
            next_role = messages[index + 1]["role"] if index + 1 < len(messages) else None
            # Consecutive tool results share one user turn.
            parts.append("<|im_start|>user" if previous_role != "tool" else "")
            parts.append(f"\n<tool_response>\n{message['content']}\n</tool_response>")
            parts.append("<|im_end|>\n" if next_role != "tool" else "")
        elif role != "system":
            raise ValueError(f"messages[{index}].role: unknown role {role!r}")
    if add_generation_prompt:
        parts.append(ASSISTANT_HEADER)
        if not enable_thinking:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def render_prompt(messages, tools=None, *, enable_thinking=True, tool_style="bare"):
    """The template's rendering of `messages` with add_generation_prompt=True."""
    return render_chat(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking,
                       tool_style=tool_style)


def _as_qwen_tool(tool):
    """``tool`` in the OpenAI wrapping ``{"type": "function", "function": ...}``."""
    return tool if "function" in tool else {"type": "function", "function": tool}


def _styled_tool(tool, tool_style):
    return _as_qwen_tool(tool) if tool_style == "openai" else tool


def _render_system_and_tools(messages, tools, tool_style):
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if not tools:
        return "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    tool_lines = "".join("\n" + _to_json(_styled_tool(tool, tool_style)) for tool in tools)
    intro = "" if system is None else system + "\n\n"
    return f"<|im_start|>system\n{intro}{_TOOLS_HEADER}{tool_lines}{_TOOLS_FOOTER}"


def _last_query_index(messages):
    """Index of the last real user query; a user turn wrapping a tool response does not count."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] != "user":
            continue
        content = messages[index]["content"]
        if not (content.startswith("<tool_response>") and content.endswith("</tool_response>")):
            return index
    return len(messages) - 1


def final_turn_thinks(messages):
    """True when the last message gets a think block (it follows the last real user query)."""
    return len(messages) - 1 > _last_query_index(messages)


def _reasoning_and_content(message):
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        return reasoning, content
    if "</think>" in content:
        # Reasoning inlined as "<think>...</think>answer" is moved into the think block.
        before_first_close = content.partition("</think>")[0]
        after_last_close = content.rpartition("</think>")[2]
        return before_first_close.rstrip("\n").split("<think>")[-1].lstrip("\n"), after_last_close.lstrip("\n")
    return "", content


def render_assistant(message, after_last_query, is_last):
    """One assistant turn as the template renders it (header to ``<|im_end|>\\n``)."""
    reasoning, content = _reasoning_and_content(message)
    # Reasoning survives only after the last user query, where the final turn gets a think block
    # even when it has no reasoning ("<think>\n\n</think>\n\n").
    if after_last_query and (is_last or reasoning):
        text = (ASSISTANT_HEADER + THINK_OPEN + reasoning.strip("\n") + "\n</think>\n\n"
                + content.lstrip("\n"))
    else:
        text = ASSISTANT_HEADER + content
    for position, call in enumerate(message.get("tool_calls") or []):
        if position > 0 or content:
            text += "\n"
        text += _render_tool_call(call)
    return text + "<|im_end|>\n"


def _render_tool_call(call):
    if call.get("function"):
        call = call["function"]
    arguments = call["arguments"]
    # Strings are printed verbatim, anything else as JSON, as the template does. Loaded records hold
    # decoded dicts, so a target always shows the canonical '{"k": v}' spacing, whatever the source.
    arguments_text = arguments if isinstance(arguments, str) else _to_json(arguments)
    return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments_text}}}\n</tool_call>'


def _to_json(value):
    # transformers' tojson filter: json.dumps without ASCII escaping or key sorting.
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- parsing a response

_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    """One parsed completion.

    ``tool_calls`` is a list of ``{"name", "arguments"}`` when the response has
    tool-call blocks and None for a text reply. ``reply`` is the text after
    ``</think>`` outside any tool-call block, stripped. ``error`` says why the
    response is malformed (then it scores -1), None when well formed.
    """

    reasoning: str | None
    tool_calls: list[dict] | None
    reply: str
    error: str | None = None


def _malformed(error: str, reasoning: str | None = None) -> ParsedResponse:
    return ParsedResponse(reasoning=reasoning, tool_calls=None, reply="", error=error)


def _strip_end_token(text: str) -> str:
    text = text.rstrip()
    for token in END_TOKENS:
        if text.endswith(token):
            return text[: -len(token)].rstrip()
    return text


def _reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys in a JSON object: {sorted(keys)}")
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_call(block: str) -> dict:
    """The ``{"name", "arguments"}`` in one block's text; ValueError when malformed."""
    call = json.loads(block.strip(), object_pairs_hook=_reject_duplicate_keys,
                      parse_constant=_reject_constant)
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be a JSON object, got {type(call).__name__}")
    if set(call) != {"name", "arguments"}:
        raise ValueError(f"a tool call needs exactly the keys name and arguments, got {sorted(call)}")
    if not isinstance(call["name"], str) or not call["name"]:
        raise ValueError(f"tool call name must be a non-empty string, got {call['name']!r}")
    if not isinstance(call["arguments"], dict):
        raise ValueError("tool call arguments must be a JSON object")
    return {"name": call["name"], "arguments": call["arguments"]}


def parse_response(text: str) -> ParsedResponse:
    """Split a completion (starting with ``<think>``) into reasoning, calls and reply."""
    if not isinstance(text, str):
        raise ValueError(f"response must be a str, got {type(text).__name__}")
    text = _strip_end_token(text)
    opens, closes = text.count(THINK_OPEN_TAG), text.count(THINK_CLOSE_TAG)
    if opens != 1 or closes != 1:
        return _malformed(f"expected exactly one think block, found {opens} {THINK_OPEN_TAG} "
                          f"and {closes} {THINK_CLOSE_TAG}")
    open_at, close_at = text.index(THINK_OPEN_TAG), text.index(THINK_CLOSE_TAG)
    if close_at < open_at:
        return _malformed(f"{THINK_CLOSE_TAG} comes before {THINK_OPEN_TAG}")
    if text[:open_at].strip():
        return _malformed(f"text before {THINK_OPEN_TAG}")
    reasoning = text[open_at + len(THINK_OPEN_TAG):close_at].strip()
    body = text[close_at + len(THINK_CLOSE_TAG):]

    blocks = _CALL_BLOCK.findall(body)
    outside = _CALL_BLOCK.sub("\n", body)
    if CALL_OPEN in outside or CALL_CLOSE in outside or any(CALL_OPEN in b for b in blocks):
        return _malformed("unbalanced or nested tool_call tags", reasoning)
    if not blocks:
        return ParsedResponse(reasoning=reasoning, tool_calls=None, reply=body.strip())
    calls = []
    for number, block in enumerate(blocks, start=1):
        try:
            calls.append(_parse_call(block))
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            return _malformed(f"tool call {number}: {error}", reasoning)
    return ParsedResponse(reasoning=reasoning, tool_calls=calls, reply=outside.strip())
