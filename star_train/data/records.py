"""STAR records: jsonl of ``{"id", "messages", "tools"}``, validated, and their training pair.

A record's last message is the assistant answer to learn (the CKD target, the Sim-RL
reference); ``build_example`` renders the (prompt, target) text pair in the Qwen3 format.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..chat.qwen3 import ASSISTANT_HEADER, ROLES, THINK_OPEN, final_turn_thinks, render_assistant, render_prompt
from .tools import is_json_schema


class _FieldError(ValueError):
    """A problem in one field of a record; validate_record adds which record it was."""

    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")


# ---------------------------------------------------------------- loading and validation

def load_records(path, limit: int = 0):
    """Read a STAR jsonl file; returns validated records (see validate_record), blank lines
    skipped; with ``limit`` > 0 only the first ``limit`` records (the rest is not read)."""
    records = []
    with open(Path(path), encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if limit and len(records) == limit:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not valid JSON ({error})") from None
            records.append(validate_record(raw, line_number))
    return records


def validate_record(record, line_number=None):
    """Check one record; returns a normalized copy or raises ValueError naming the record and field.

    Normalizations (everything else, tools above all, is returned exactly as given):
    tool-call arguments given as a JSON string are decoded to a dict, a {"function": {...}} tool
    call is unwrapped to {name, arguments}, and an assistant's null content becomes "" (the
    template reads `message.content` unguarded, so transformers fails on a null or missing one).
    """
    where = f"line {line_number}" if line_number is not None else "record"
    if isinstance(record, dict) and "id" in record:
        where = f"record {record['id']!r}" + (f" (line {line_number})" if line_number is not None else "")
    try:
        if not isinstance(record, dict):
            raise _FieldError("record", f"expected a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
            raise _FieldError("id", "missing or not a non-empty string/integer")
        tools = record.get("tools")
        _check_tools([] if tools is None else tools)
        return {**record, "messages": _checked_messages(record.get("messages")),
                "tools": [] if tools is None else tools}
    except _FieldError as error:
        raise ValueError(f"{where}: {error}") from None


def _checked_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise _FieldError("messages", "expected a non-empty list of messages")
    checked = [_checked_message(f"messages[{index}]", message) for index, message in enumerate(messages)]
    if checked[-1]["role"] != "assistant":
        raise _FieldError(f"messages[{len(checked) - 1}].role",
                          f"the last message must be the assistant target, got {checked[-1]['role']!r}")
    if not final_turn_thinks(checked):
        # Without a user query the template opens no think block for the target, so there is no
        # STAR training pair (prompt ending in <think>, target ending in </think> + calls).
        raise _FieldError("messages", "no user query before the final assistant message")
    return checked


def _checked_message(field, message):
    if not isinstance(message, dict):
        raise _FieldError(field, "expected an object")
    role = message.get("role")
    if role not in ROLES:
        raise _FieldError(f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if role == "assistant" and content is None:
        content = ""
    if not isinstance(content, str):
        raise _FieldError(f"{field}.content", f"expected a string, got {type(content).__name__}")
    checked = {**message, "content": content}
    if role == "assistant":
        if not isinstance(message.get("reasoning_content"), (str, type(None))):
            raise _FieldError(f"{field}.reasoning_content", "expected a string or null")
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _FieldError(f"{field}.tool_calls", "expected a list")
            checked["tool_calls"] = [_checked_tool_call(f"{field}.tool_calls[{index}]", call)
                                     for index, call in enumerate(calls)]
    elif message.get("tool_calls"):
        raise _FieldError(f"{field}.tool_calls", f"only assistant messages carry tool calls, not {role!r}")
    return checked


def _checked_tool_call(field, call):
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call, field = call["function"], f"{field}.function"
    if not isinstance(call, dict):
        raise _FieldError(field, "expected an object with name and arguments")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise _FieldError(f"{field}.name", "missing or not a non-empty string")
    if "arguments" not in call:
        raise _FieldError(f"{field}.arguments", "missing")
    arguments = call["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise _FieldError(f"{field}.arguments", "a string that is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise _FieldError(f"{field}.arguments", f"expected an object (or its JSON string), got "
                                                 f"{type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


def _check_tools(tools):
    if not isinstance(tools, list):
        raise _FieldError("tools", f"expected a list, got {type(tools).__name__}")
    for index, tool in enumerate(tools):
        field = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise _FieldError(field, "expected an object with name, description, parameters")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _FieldError(f"{field}.name", "missing or not a non-empty string")
        if not isinstance(tool.get("description", ""), str):
            raise _FieldError(f"{field}.description", "expected a string")
        if "parameters" not in tool:
            raise _FieldError(f"{field}.parameters", "missing")
        _check_parameters(f"{field}.parameters", tool["parameters"])


def _check_parameters(field, parameters):
    """Either parameter shape, told apart by ``data.tools.is_json_schema`` (the one rule)."""
    if not isinstance(parameters, dict):
        raise _FieldError(field, f"expected an object, got {type(parameters).__name__}")
    if is_json_schema(parameters):
        kind = parameters.get("type", "object")
        if kind not in ("object", "dict"):
            raise _FieldError(f"{field}.type", f"expected 'object' or 'dict', got {kind!r}")
        required = parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise _FieldError(f"{field}.required", "expected a list of parameter names")
        specs_field, specs = f"{field}.properties", parameters.get("properties", {})
    else:
        specs_field, specs = field, parameters
    if not isinstance(specs, dict):
        raise _FieldError(specs_field, "expected an object of parameter specs")
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise _FieldError(f"{specs_field}.{name}", "expected a parameter spec object")


def build_example(record, fmt=None):
    """STAR training pair (prompt, target); prompt + target == render_chat(all messages, tools).

    prompt: every message but the last, tools, generation prompt and "<think>\\n";
    target: the last assistant message from its reasoning to "</think>", calls and "<|im_end|>\\n".
    ``fmt``: another tool-call format or layout (a ``chat.formats`` format or its name, or a
    ``chat.templates.ChatRenderer``); None (the default) is the Qwen3 rendering above.
    """
    record = validate_record(record)
    if fmt is not None:
        from ..chat.templates import ChatRenderer, chat_renderer

        return (fmt if isinstance(fmt, ChatRenderer) else chat_renderer(fmt=fmt)).example(record)
    messages, tools = record["messages"], record["tools"]
    prompt = render_prompt(messages[:-1], tools) + THINK_OPEN
    final_turn = render_assistant(messages[-1], after_last_query=True, is_last=True)
    target = final_turn[len(ASSISTANT_HEADER + THINK_OPEN):]
    return prompt, target
