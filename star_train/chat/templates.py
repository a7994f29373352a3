"""Rendering a conversation for a model: its own chat template when that handles tools,
else the Qwen3 tool layout written as text for the model's tokenizer.

:func:`chat_renderer` picks the layout (``ChatRenderer.layout`` says which applied):

* ``"model-template"``: the tokenizer has a chat template that reads ``tools``; the text
  is ``tokenizer.apply_chat_template(messages, tools=...)`` (tools and calls handed over in
  the OpenAI shape every tool template reads), and the tool-call format is the one the
  template writes (:func:`template_format`: ``<tool_call>`` -> Hermes, ``"parameters"`` or
  ``<|python_tag|>`` -> Llama 3.1 JSON) unless one is given. No think block is added.
* ``"qwen3-layout"``: anything else (SmolLM2's template, for one, ignores tools; the
  offline Qwen3 tokenizer has no template): ``chat.qwen3``'s renderer, ChatML markers,
  the prompt ending in ``<think>\\n`` as STAR trains. With the Hermes format this is the
  Qwen3 template's text byte for byte; with another format the tool instructions and the
  calls are that format's text (``ToolCallFormat.text_messages``) inside the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import qwen3
from .formats import HERMES, LLAMA31_JSON, PYTHON_TAG, ToolCallFormat, get_format
from .qwen3 import ParsedResponse


def template_handles_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def template_format(tokenizer) -> ToolCallFormat | None:
    """The call format a tool-aware chat template writes, None when it is not recognised."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<tool_call>" in template:
        return HERMES
    if PYTHON_TAG in template or '"parameters": ' in template:
        return LLAMA31_JSON
    return None


def _openai_call(call: dict) -> dict:
    call = call.get("function", call)
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


@dataclass(frozen=True)
class ChatRenderer:
    fmt: ToolCallFormat
    layout: str                 # "qwen3-layout" or "model-template"
    tokenizer: Any = None       # the model-template layout renders with it

    @property
    def think(self) -> bool:
        return self.layout == "qwen3-layout"

    # ------------------------------------------------------------ text
    def prompt(self, messages: list, tools: list | None = None) -> str:
        """The prompt text, ending where the model's completion starts."""
        if self.layout == "model-template":
            return self._apply(messages, tools, add_generation_prompt=True)
        messages, tools = self._qwen3_inputs(messages, tools)
        return qwen3.render_prompt(messages, tools or None) + qwen3.THINK_OPEN

    def example(self, record: dict) -> tuple[str, str]:
        """``(prompt, target)`` of a STAR record (its last message is the target); prompt +
        target is the whole conversation's text."""
        messages, tools = record["messages"], record.get("tools") or []
        if self.layout == "model-template":
            prompt = self._apply(messages[:-1], tools, add_generation_prompt=True)
            full = self._apply(messages, tools, add_generation_prompt=False)
            if not full.startswith(prompt):
                raise ValueError("the chat template renders the conversation so that it does not "
                                 "start with the prompt's text: no (prompt, target) split")
            return prompt, full[len(prompt):]
        messages, tools = self._qwen3_inputs(messages, tools)
        prompt = qwen3.render_prompt(messages[:-1], tools or None) + qwen3.THINK_OPEN
        final = qwen3.render_assistant(messages[-1], after_last_query=True, is_last=True)
        return prompt, final[len(qwen3.ASSISTANT_HEADER + qwen3.THINK_OPEN):]

    def render_answer(self, calls: list | None, reply: str = "", reasoning: str = "") -> str:
        """A completion (what follows the prompt) making ``calls`` or replying ``reply``."""
        body = self.fmt.render_calls(calls) if calls else reply
        if self.think:
            return reasoning + "\n</think>\n\n" + body
        return body

    def parse_completion(self, completion: str) -> ParsedResponse:
        """Parse the text generated after :meth:`prompt`."""
        if not isinstance(completion, str):
            raise ValueError(f"completion: expected a str, got {type(completion).__name__}")
        if self.think:
            return self.fmt.parse(qwen3.THINK_OPEN + completion, True)
        return self.fmt.parse(completion, False)

    def full_response(self, completion: str) -> str:
        """The response as the reward reads it (``parse(full_response)``)."""
        return qwen3.THINK_OPEN + completion if self.think else completion

    def parse(self, response: str) -> ParsedResponse:
        """``ToolCallFormat.parse`` with this layout's think setting (a reward's ``parse``)."""
        return self.fmt.parse(response, self.think)

    # ------------------------------------------------------------ internals
    def _qwen3_inputs(self, messages, tools):
        if self.fmt is HERMES:
            return messages, tools
        return self.fmt.text_messages(messages, tools), None

    def _apply(self, messages, tools, add_generation_prompt):
        converted = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [_openai_call(c) for c in message["tool_calls"]]
            converted.append(message)
        return self.tokenizer.apply_chat_template(
            converted, tools=[qwen3._as_qwen_tool(t) for t in tools] or None, tokenize=False,
            add_generation_prompt=add_generation_prompt)


def chat_renderer(tokenizer=None, fmt=None, *, use_model_template: bool = True) -> ChatRenderer:
    """The renderer for a model's ``tokenizer`` and tool-call ``fmt`` (a format or its name;
    default: the template's own format, else Hermes). See the module doc for the rule."""
    fmt = get_format(fmt) if fmt is not None else None
    if use_model_template and tokenizer is not None and template_handles_tools(tokenizer):
        own = template_format(tokenizer)
        if fmt is None and own is None:
            raise ValueError("fmt: the chat template handles tools in a format not recognised here; "
                             "name one (hermes, llama3.1-json) or pass use_model_template=False")
        return ChatRenderer(fmt or own, "model-template", tokenizer)
    return ChatRenderer(fmt or HERMES, "qwen3-layout", None)
