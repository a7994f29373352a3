"""The chat format the evaluator speaks: one function builds a prompt, one reads a completion.

Everything format-specific in ``star_train.eval`` goes through a ``ChatFormat``, so another
format (issue 14) is one more instance here. ``QWEN3``: the Qwen3 chat template's text
with the tools in the system prompt, generation starting inside the think block (the
prompt STAR trains on), calls read back from ``<tool_call>`` blocks. ``QWEN3_NO_THINK``:
the same with Qwen3's ``enable_thinking=False`` prompt (an empty think block already
closed), for models that do not think.

The format is text only: which tokenizer encodes that text is the generate function's
business (a SmolLM2 run encodes the Qwen3 layout with SmolLM2's own tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..chat.qwen3 import THINK_OPEN, parse_response, render_prompt


@dataclass(frozen=True)
class ParsedTurn:
    """What one completion amounts to.

    ``calls``: ``[{"name", "arguments"}]`` when the completion makes calls, ``[]`` for a
    text reply, None when it does not parse (``error`` says why). ``message``: the
    assistant message to put in the conversation for the next prompt.
    """

    calls: list | None
    error: str | None
    message: dict


@dataclass(frozen=True)
class ChatFormat:
    name: str
    # (messages, tools) -> the prompt text, ending where the model's completion starts.
    build_prompt: Callable[[list, list], str]
    # completion text (what follows the prompt) -> ParsedTurn.
    parse_completion: Callable[[str], ParsedTurn]


def _qwen3_prompt(messages: list, tools: list) -> str:
    return render_prompt(messages, tools or None) + THINK_OPEN


def _qwen3_parse(completion: str) -> ParsedTurn:
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected a str, got {type(completion).__name__}")
    parsed = parse_response(THINK_OPEN + completion)
    if parsed.error is not None:
        # Kept verbatim in the history: the model sees what it wrote.
        return ParsedTurn(None, parsed.error, {"role": "assistant",
                                               "content": THINK_OPEN + completion})
    message = {"role": "assistant", "reasoning_content": parsed.reasoning or "",
               "content": parsed.reply}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return ParsedTurn(parsed.tool_calls or [], None, message)


# Qwen3's enable_thinking=False rendering: the prompt ends with an empty think block, so a
# model that was never taught to think (or to close </think>) answers directly.
_EMPTY_THINK = "<think>\n\n</think>\n\n"


def _qwen3_no_think_prompt(messages: list, tools: list) -> str:
    return render_prompt(messages, tools or None, enable_thinking=False)


def _qwen3_no_think_parse(completion: str) -> ParsedTurn:
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected a str, got {type(completion).__name__}")
    # The empty think block is part of the prompt; parse as if the model had written it.
    return _qwen3_parse(_EMPTY_THINK.removeprefix(THINK_OPEN) + completion)


QWEN3 = ChatFormat("qwen3", _qwen3_prompt, _qwen3_parse)
QWEN3_NO_THINK = ChatFormat("qwen3-no-think", _qwen3_no_think_prompt, _qwen3_no_think_parse)
FORMATS = {chat_format.name: chat_format for chat_format in (QWEN3, QWEN3_NO_THINK)}
