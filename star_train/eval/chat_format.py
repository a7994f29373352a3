"""The evaluator's names for the chat formats it speaks: a thin view of ``chat.templates``.

There is one chat-format abstraction, :class:`~star_train.chat.templates.ChatRenderer`
(prompt with tools, answer, completion -> calls or malformed); BFCL prompts and parses
through it (``prompt``, ``parse_turn``) like the stages do. ``QWEN3`` (generation starts
inside the think block, the prompt STAR trains on) and ``QWEN3_NO_THINK`` (Qwen3's
``enable_thinking=False`` prompt) are kept under their old names; any other renderer
(``chat_renderer(tokenizer, fmt, template=...)``, or ``runtime.models.model_renderer``
for a model config) evaluates the same way.
"""

from __future__ import annotations

from ..chat.templates import QWEN3, QWEN3_NO_THINK, ChatRenderer, ParsedTurn  # noqa: F401

ChatFormat = ChatRenderer  # the evaluator's former name for it
FORMATS = {chat_format.name: chat_format for chat_format in (QWEN3, QWEN3_NO_THINK)}
