"""The chat format the evaluator speaks: one function builds a prompt, one reads a completion.

Everything format-specific in ``star_train.eval`` goes through a ``ChatFormat``, so another
format (issue 14) is one more instance here. ``QWEN3`` is the only one today: the Qwen3
chat template's text with the tools in the system prompt, generation starting inside the
think block (the prompt STAR trains on), calls read back from ``<tool_call>`` blocks.

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


QWEN3 = ChatFormat("qwen3", _qwen3_prompt, _qwen3_parse)
FORMATS = {QWEN3.name: QWEN3}
