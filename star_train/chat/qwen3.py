"""STAR records (jsonl of {"id", "messages", "tools"}) and a plain-Python Qwen3 chat renderer.

The renderer reproduces the Qwen3 chat template (shared/data/qwen3_chat_template.jinja) as
transformers' `apply_chat_template` renders it, byte for byte, without jinja at run time.
"""
import json
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN = "<think>\n"

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')


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
    if not _final_turn_thinks(checked):
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
    """Accept a JSON schema {"type": "object"|"dict", "properties", "required"} or a flat {param: spec}."""
    if not isinstance(parameters, dict):
        raise _FieldError(field, f"expected an object, got {type(parameters).__name__}")
    # A string "type" marks a JSON schema; in the flat shape a parameter may itself be called
    # "type" (xLAM has such tools), but its value is then a spec dict.
    if isinstance(parameters.get("type"), str):
        if parameters["type"] not in ("object", "dict"):
            raise _FieldError(f"{field}.type", f"expected 'object' or 'dict', got {parameters['type']!r}")
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


# ---------------------------------------------------------------- Qwen3 rendering

def render_chat(messages, tools=None, *, add_generation_prompt=False, enable_thinking=True):
    """The Qwen3 chat template's text for `messages` (STAR-shaped dicts) and STAR `tools`."""
    if not messages:
        raise ValueError("messages: empty conversation")
    parts = [_render_system_and_tools(messages, tools)]
    last_query = _last_query_index(messages)
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "user" or (role == "system" and index > 0):
            parts.append(f"<|im_start|>{role}\n{message['content']}<|im_end|>\n")
        elif role == "assistant":
            parts.append(_render_assistant(message, index > last_query, index == len(messages) - 1))
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
        parts.append("<|im_start|>assistant\n")
        if not enable_thinking:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def render_prompt(messages, tools=None, *, enable_thinking=True):
    """The template's rendering of `messages` with add_generation_prompt=True."""
    return render_chat(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)


def build_example(record):
    """STAR training pair (prompt, target); prompt + target == render_chat(all messages, tools).

    prompt: every message but the last, tools, generation prompt and "<think>\\n";
    target: the last assistant message from its reasoning to "</think>", calls and "<|im_end|>\\n".
    """
    record = validate_record(record)
    messages, tools = record["messages"], record["tools"]
    prompt = render_prompt(messages[:-1], tools) + THINK_OPEN
    final_turn = _render_assistant(messages[-1], after_last_query=True, is_last=True)
    target = final_turn[len("<|im_start|>assistant\n" + THINK_OPEN):]
    return prompt, target


def _as_qwen_tool(tool):
    # The template prints each tool with tojson exactly as it is handed over. Qwen3 users pass the
    # OpenAI shape {"type": "function", "function": {...}} (Qwen's function-calling docs, vLLM and
    # transformers' get_json_schema all produce it), so that is the text Qwen3 was post-trained on
    # and will see at inference; a bare STAR tool would print as {"name": ...} instead.
    return tool if "function" in tool else {"type": "function", "function": tool}


def _render_system_and_tools(messages, tools):
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if not tools:
        return "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    tool_lines = "".join("\n" + _to_json(_as_qwen_tool(tool)) for tool in tools)
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


def _final_turn_thinks(messages):
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


def _render_assistant(message, after_last_query, is_last):
    reasoning, content = _reasoning_and_content(message)
    # Reasoning survives only after the last user query, where the final turn gets a think block
    # even when it has no reasoning ("<think>\n\n</think>\n\n").
    if after_last_query and (is_last or reasoning):
        text = ("<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                + content.lstrip("\n"))
    else:
        text = "<|im_start|>assistant\n" + content
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
