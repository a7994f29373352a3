"""Tool-call formats as a component: how calls are written in a response and read back.

A :class:`ToolCallFormat` renders ``[{"name", "arguments"}]`` calls as the assistant text
a model writes, tells the model how to call (the tool instructions of the prompt) and
parses a completion back into a :class:`~star_train.chat.qwen3.ParsedResponse`, the one
shape the reward (STAR's released rules apply to the parsed calls), rollouts, CKD data
rendering and BFCL scoring read. Two formats:

* ``HERMES`` (``"hermes"``): Qwen/Hermes ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks, one per call, newline-separated. Exactly ``chat.qwen3``'s renderer and parser:
  the Qwen3 default, byte for byte.
* ``LLAMA31_JSON`` (``"llama3.1-json"``): Llama 3.1's JSON tool calling. The answer is
  the call itself, ``{"name": ..., "parameters": {...}}`` (Meta's template writes exactly
  ``'{"name": "' + name + '", "parameters": ' + arguments|tojson + '}'``), optionally
  after ``<|python_tag|>`` (what the model emits for built-in tools and often for custom
  ones). Meta's template refuses more than one call per turn; parallel calls are written
  ``; ``-separated, the convention of vLLM's ``llama3_json`` parser, which also accepts
  ``"arguments"`` for ``"parameters"`` (so do we). The tool instructions are the system
  variant of Meta's template: "You have access to the following functions. ..." and each
  tool as ``tojson(indent=4)``.

Both keep STAR's response layout around the calls: a think block first when
``think=True`` (the prompt ends in ``<think>\\n``), then the calls or a text reply.
Strictness matches the Hermes parser: text that starts like a call (``{``, ``[`` or
``<|python_tag|>``) but is not a well-formed call is malformed (-1), never a text reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from . import qwen3
from .qwen3 import ParsedResponse

PYTHON_TAG = "<|python_tag|>"
LLAMA_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
LLAMA31_TOOLS_INTRO = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    'function call.Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}.Do not use variables.\n\n")


def _to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _plain_call(call: dict, where: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: expected a dict with name and arguments, got {type(call).__name__}")
    call = call.get("function", call) if isinstance(call.get("function"), dict) else call
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.arguments: expected an object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


def _checked_calls(calls) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"calls: expected a non-empty list of calls, got {calls!r}")
    return [_plain_call(call, f"calls[{i}]") for i, call in enumerate(calls)]


# ---------------------------------------------------------------- the think block

def _strip_end(text: str) -> str:
    text = qwen3._strip_end_token(text)
    for token in LLAMA_END_TOKENS:
        if text.endswith(token):
            return text[: -len(token)].rstrip()
    return text


def split_end(text: str) -> tuple[str, bool]:
    """``(text without a trailing end-of-turn token, whether it had one)``."""
    stripped = _strip_end(text)
    return stripped, stripped != text.rstrip()


def split_think(text: str, think: bool) -> tuple[str | None, str, str | None]:
    """``(reasoning, body, error)`` with the think-block rules of ``qwen3.parse_response``;
    without ``think`` the whole text is the body and a think tag in it is an error."""
    if not isinstance(text, str):
        raise ValueError(f"response must be a str, got {type(text).__name__}")
    text = _strip_end(text)
    opens, closes = text.count(qwen3.THINK_OPEN_TAG), text.count(qwen3.THINK_CLOSE_TAG)
    if not think:
        if opens or closes:
            return None, "", "a think tag in a response without a think block"
        return None, text, None
    if opens != 1 or closes != 1:
        return None, "", (f"expected exactly one think block, found {opens} {qwen3.THINK_OPEN_TAG} "
                          f"and {closes} {qwen3.THINK_CLOSE_TAG}")
    open_at, close_at = text.index(qwen3.THINK_OPEN_TAG), text.index(qwen3.THINK_CLOSE_TAG)
    if close_at < open_at:
        return None, "", f"{qwen3.THINK_CLOSE_TAG} comes before {qwen3.THINK_OPEN_TAG}"
    if text[:open_at].strip():
        return None, "", f"text before {qwen3.THINK_OPEN_TAG}"
    reasoning = text[open_at + len(qwen3.THINK_OPEN_TAG):close_at].strip()
    return reasoning, text[close_at + len(qwen3.THINK_CLOSE_TAG):], None


# ---------------------------------------------------------------- Llama 3.1 JSON

def _llama_call(obj, number: int) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"call {number}: a tool call must be a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys not in ({"name", "parameters"}, {"name", "arguments"}):
        raise ValueError(f"call {number}: needs exactly the keys name and parameters, got {sorted(keys)}")
    name, arguments = obj["name"], obj.get("parameters", obj.get("arguments"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"call {number}: name must be a non-empty string, got {name!r}")
    if not isinstance(arguments, dict):
        raise ValueError(f"call {number}: parameters must be a JSON object")
    return {"name": name, "arguments": arguments}


def _llama_objects(body: str) -> list:
    """The JSON values of ``body``: one list, or objects separated by ``;`` or whitespace."""
    decoder = json.JSONDecoder(object_pairs_hook=qwen3._reject_duplicate_keys,
                               parse_constant=qwen3._reject_constant)
    body = body.strip()
    if body.startswith("["):
        value, end = decoder.raw_decode(body)
        if body[end:].strip():
            raise ValueError("text after the list of calls")
        if not isinstance(value, list) or not value:
            raise ValueError("an empty list of calls")
        return value
    values, position = [], 0
    while position < len(body):
        value, position = decoder.raw_decode(body, position)
        values.append(value)
        rest = body[position:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
            if not rest:
                raise ValueError("a ';' with no call after it")
        position = len(body) - len(rest)
    return values


def parse_llama31(text: str, think: bool = True) -> ParsedResponse:
    reasoning, body, error = split_think(text, think)
    if error is not None:
        return ParsedResponse(reasoning, None, "", error)
    stripped = body.strip()
    tagged = stripped.startswith(PYTHON_TAG)
    if tagged:
        stripped = stripped[len(PYTHON_TAG):].strip()
    elif PYTHON_TAG in stripped:
        return ParsedResponse(reasoning, None, "", f"{PYTHON_TAG} after text")
    if not tagged and not stripped.startswith(("{", "[")):
        return ParsedResponse(reasoning, None, stripped)  # a text reply
    try:
        calls = [_llama_call(obj, n) for n, obj in enumerate(_llama_objects(stripped), start=1)]
    except ValueError as problem:  # json.JSONDecodeError is a ValueError
        return ParsedResponse(reasoning, None, "", f"tool call: {problem}")
    if not calls:
        return ParsedResponse(reasoning, None, "", f"{PYTHON_TAG} without a call")
    return ParsedResponse(reasoning, calls, "")


def render_llama31_calls(calls) -> str:
    return "; ".join('{"name": "' + c["name"] + '", "parameters": ' + _to_json(c["arguments"]) + "}"
                     for c in _checked_calls(calls))


def llama31_tools_text(tools: list) -> str:
    return LLAMA31_TOOLS_INTRO + "".join(json.dumps(tool, ensure_ascii=False, indent=4) + "\n\n" for tool in tools)


# ---------------------------------------------------------------- Hermes (Qwen3)

def parse_hermes(text: str, think: bool = True) -> ParsedResponse:
    if think:
        return qwen3.parse_response(text)
    # Without a think block: parse as if the model had written an empty one.
    reasoning, body, error = split_think(text, think=False)
    if error is not None:
        return ParsedResponse(None, None, "", error)
    parsed = qwen3.parse_response(qwen3.THINK_OPEN_TAG + qwen3.THINK_CLOSE_TAG + body)
    return ParsedResponse(None, parsed.tool_calls, parsed.reply, parsed.error)


def render_hermes_calls(calls) -> str:
    return "\n".join(qwen3._render_tool_call(call) for call in _checked_calls(calls))


def hermes_tools_text(tools: list) -> str:
    """The tool instructions of the Qwen3 template's system prompt, without its end token."""
    lines = "".join("\n" + _to_json(qwen3._as_qwen_tool(tool)) for tool in tools)
    return qwen3._TOOLS_HEADER + lines + qwen3._TOOLS_FOOTER.removesuffix("<|im_end|>\n")


# ---------------------------------------------------------------- the component

@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    render_calls: Callable[[list], str]         # calls -> the assistant text that makes them
    tools_text: Callable[[list], str]           # STAR tools -> the prompt's tool instructions
    parse: Callable[..., ParsedResponse]        # (response, think=True) -> ParsedResponse

    def parse_response(self, text: str, think: bool = True) -> ParsedResponse:
        return self.parse(text, think)

    def text_messages(self, messages: list, tools: list | None) -> list:
        """``messages`` with the tools and calls written as this format's text (for a chat
        renderer that knows no tools): the tool instructions open the system message, an
        assistant's ``tool_calls`` follow its content. Hermes is never rewritten: the Qwen3
        renderer writes it natively (``chat.templates``)."""
        out = [dict(m) for m in messages]
        for index, message in enumerate(out):
            if message["role"] == "assistant" and message.get("tool_calls"):
                calls = self.render_calls(message.pop("tool_calls"))
                content = message.get("content") or ""
                message["content"] = content + ("\n" if content else "") + calls
        if tools:
            intro = self.tools_text(tools)
            if out and out[0]["role"] == "system":
                out[0]["content"] = out[0]["content"] + "\n\n" + intro
            else:
                out.insert(0, {"role": "system", "content": intro.rstrip("\n")})
        return out


HERMES = ToolCallFormat("hermes", render_hermes_calls, hermes_tools_text, parse_hermes)
LLAMA31_JSON = ToolCallFormat("llama3.1-json", render_llama31_calls, llama31_tools_text, parse_llama31)
FORMATS = {fmt.name: fmt for fmt in (HERMES, LLAMA31_JSON)}


def get_format(name) -> ToolCallFormat:
    """A format by name (or the format itself); ValueError naming the known ones."""
    if isinstance(name, ToolCallFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"tool_call_format: unknown {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]
