"""The chat format of a model: one object renders its prompts and answers and reads its
completions back. Rollouts, the reward, CKD/SFT data and BFCL eval all take a
:class:`ChatRenderer`, so they agree on the layout and the tool-call format.

A renderer is a layout plus a tool-call format (``chat.formats``: ``hermes`` or
``llama3.1-json``). :func:`chat_renderer` picks them from a model's tokenizer and two
choices, the model config's ``chat_template`` and ``tool_format`` keys
(``runtime.models.model_renderer`` reads them off a ``ModelSpec``):

``chat_template``
  * ``"qwen3"``: ``chat.qwen3``'s renderer, ChatML markers, the prompt ending in
    ``<think>\\n`` as STAR trains, written as text for whatever tokenizer encodes it.
    With the Hermes format this is the Qwen3 template's text byte for byte (the offline
    Qwen3 path); with another format the tool instructions and the calls are that
    format's text (``ToolCallFormat.text_messages``) inside the same layout.
  * ``"qwen3-no-think"``: the same with Qwen3's ``enable_thinking=False`` prompt (an empty
    think block already closed), for models that do not think.
  * ``"model"``: the tokenizer's own chat template, which must read ``tools``: the text
    is ``tokenizer.apply_chat_template(messages, tools=...)`` (tools and calls handed over
    in the OpenAI shape every tool template reads). No think block is added; when the
    template writes think blocks, a response must hold one, opened by the model.
  * ``"auto"`` (the default): ``"model"`` when the tokenizer's template handles tools and
    is not Qwen3's own (a Qwen3 template, recognised by ``<tool_call>`` and ``<think>``,
    gets the ``"qwen3"`` layout: the same text, and STAR's prompt ends inside the think
    block), else ``"qwen3"`` (SmolLM2's template, for one, ignores tools; the offline
    Qwen3 tokenizer has none).

``tool_format``: ``"auto"`` (the default) is the format the model's template writes under
``"model"`` (:func:`template_format`: ``<tool_call>`` -> Hermes, ``"parameters"`` or
``<|python_tag|>`` -> Llama 3.1 JSON) and Hermes under the Qwen3 layouts.

What a completion is: the text generated after :meth:`ChatRenderer.prompt`. The
*response* is the completion with what the prompt already holds of the answer in front
(``response_prefix``: ``<think>\\n``, the closed empty think block, or nothing), as the
reward and the parser read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import qwen3
from .formats import (
    FORMATS,
    HERMES,
    LLAMA31_JSON,
    LLAMA_END_TOKENS,
    PYTHON_TAG,
    ToolCallFormat,
    get_format,
)
from .qwen3 import ParsedResponse

LAYOUTS = ("qwen3-layout", "model-template")
CHAT_TEMPLATES = ("auto", "qwen3", "qwen3-no-think", "model")
TOOL_FORMATS = ("auto", *FORMATS)
# Qwen3's enable_thinking=False generation prompt ends with this empty, closed think block.
EMPTY_THINK = qwen3.THINK_OPEN + "\n" + qwen3.THINK_CLOSE_TAG + "\n\n"


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


def is_qwen3_template(tokenizer) -> bool:
    """Qwen3's own template (Hermes calls and a think block): the Qwen3 layout is its text."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "<tool_call>" in template and qwen3.THINK_OPEN_TAG in template


def _openai_call(call: dict) -> dict:
    call = call.get("function", call)
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


@dataclass(frozen=True)
class ParsedTurn:
    """What one completion amounts to in a conversation (BFCL's multi-turn dialogues).

    ``calls``: ``[{"name", "arguments"}]`` when the completion makes calls, ``[]`` for a
    text reply, None when it does not parse (``error`` says why). ``message``: the
    assistant message to put in the conversation for the next prompt.
    """

    calls: list | None
    error: str | None
    message: dict


@dataclass(frozen=True)
class ChatRenderer:
    fmt: ToolCallFormat
    layout: str                 # "qwen3-layout" or "model-template"
    tokenizer: Any = None       # the model-template layout renders with it
    # qwen3-layout: the prompt opens the think block (False: Qwen3's enable_thinking=False
    # prompt, an empty one closed); model-template: the template writes think blocks, so a
    # response has one, which the model opens itself
    thinking: bool = True

    # ------------------------------------------------------------ what it is
    @property
    def name(self) -> str:
        """``"qwen3"`` / ``"qwen3-no-think"`` for the Qwen3 format itself (the names BFCL
        results files have always recorded), else ``"<template>/<tool format>"``."""
        if self.layout == "model-template":
            return f"model/{self.fmt.name}"
        template = "qwen3" if self.thinking else "qwen3-no-think"
        return template if self.native else f"{template}/{self.fmt.name}"

    @property
    def think(self) -> bool:
        """Whether a response holds a think block: always in the Qwen3 layouts (without
        thinking the prompt holds an empty one), in a model template's when it writes them."""
        return self.layout == "qwen3-layout" or self.thinking

    @property
    def native(self) -> bool:
        """The Qwen3 format itself (Hermes calls in the Qwen3 layout): responses are scored
        by the reward exactly as written, as the released code scores them."""
        return self.layout == "qwen3-layout" and self.fmt is HERMES

    @property
    def response_prefix(self) -> str:
        """What the prompt already holds of the response."""
        if self.layout == "model-template":
            return ""
        return qwen3.THINK_OPEN if self.thinking else EMPTY_THINK

    @property
    def end_token(self) -> str:
        """The token that ends the model's turn (generation stops there)."""
        if self.layout == "qwen3-layout":
            return qwen3.END_OF_TURN
        return self.tokenizer.eos_token

    @property
    def stop_tokens(self) -> tuple:
        """Tokens that end a completion (a generator skips those its tokenizer lacks)."""
        if self.layout == "qwen3-layout":
            return qwen3.END_TOKENS
        return tuple(dict.fromkeys((self.tokenizer.eos_token, *LLAMA_END_TOKENS, *qwen3.END_TOKENS)))

    # ------------------------------------------------------------ text
    def prompt(self, messages: list, tools: list | None = None, *, open_think: bool = True) -> str:
        """The prompt text, ending where the model's completion starts. ``open_think=False``
        (Qwen3 layout with thinking): stop after the generation prompt and leave the
        ``<think>`` to the model, as the released ``teacher_rollout.py`` prompts."""
        if self.layout == "model-template":
            return self._apply(messages, tools, add_generation_prompt=True)
        messages, tools = self.qwen3_inputs(messages, tools)
        text = qwen3.render_prompt(messages, tools or None, enable_thinking=self.thinking)
        return text + (qwen3.THINK_OPEN if self.thinking and open_think else "")

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
        messages, tools = self.qwen3_inputs(messages, tools)
        prompt = (qwen3.render_prompt(messages[:-1], tools or None, enable_thinking=self.thinking)
                  + (qwen3.THINK_OPEN if self.thinking else ""))
        last = messages[-1] if self.thinking else {**messages[-1], "reasoning_content": ""}
        final = qwen3.render_assistant(last, after_last_query=True, is_last=True)
        return prompt, final[len(qwen3.ASSISTANT_HEADER) + len(self.response_prefix):]

    def render_answer(self, calls: list | None, reply: str = "", reasoning: str = "") -> str:
        """A completion (what follows the prompt) making ``calls`` or replying ``reply``."""
        body = self.fmt.render_calls(calls) if calls else reply
        if self.layout == "model-template" and self.thinking:
            return qwen3.THINK_OPEN + reasoning + "\n</think>\n\n" + body  # opened by the model
        if self.layout == "qwen3-layout" and self.thinking:
            return reasoning + "\n</think>\n\n" + body
        return body

    # ------------------------------------------------------------ reading completions
    def full_response(self, completion: str) -> str:
        """The response as the reward and :meth:`parse` read it."""
        return self.response_prefix + completion

    def parse(self, response: str) -> ParsedResponse:
        """``ToolCallFormat.parse`` of a response with this layout's think setting."""
        return self.fmt.parse(response, self.think)

    def parse_completion(self, completion: str) -> ParsedResponse:
        """Parse the text generated after :meth:`prompt`."""
        if not isinstance(completion, str):
            raise ValueError(f"completion: expected a str, got {type(completion).__name__}")
        return self.parse(self.full_response(completion))

    def parse_turn(self, completion: str) -> ParsedTurn:
        """A completion as a conversation turn: its calls and the assistant message."""
        parsed = self.parse_completion(completion)
        if parsed.error is not None:
            # Kept verbatim in the history: the model sees what it wrote.
            return ParsedTurn(None, parsed.error, {"role": "assistant",
                                                   "content": self.full_response(completion)})
        message = {"role": "assistant", "reasoning_content": parsed.reasoning or "",
                   "content": parsed.reply}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        return ParsedTurn(parsed.tool_calls or [], None, message)

    # ------------------------------------------------------------ internals
    def qwen3_inputs(self, messages, tools):
        """Messages and tools for ``chat.qwen3``'s renderer: as given for Hermes (it writes
        them natively), else with the tools and calls written as this format's text."""
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
            converted, tools=[qwen3._as_qwen_tool(t) for t in tools or []] or None, tokenize=False,
            add_generation_prompt=add_generation_prompt)


QWEN3 = ChatRenderer(HERMES, "qwen3-layout")                         # the offline Qwen3 path
QWEN3_NO_THINK = ChatRenderer(HERMES, "qwen3-layout", thinking=False)


def chat_renderer(tokenizer=None, fmt=None, *, template: str = "auto") -> ChatRenderer:
    """The renderer for a model's ``tokenizer`` (None: text only, the Qwen3 layout), tool-call
    format ``fmt`` (a format, its name, or None / ``"auto"``) and ``template`` (one of
    ``CHAT_TEMPLATES``). See the module doc for the rule; a bad choice is a ValueError
    naming ``chat_template`` or ``tool_format``."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template: unknown {template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    if fmt == "auto":
        fmt = None
    fmt = get_format(fmt) if fmt is not None else None
    handles = tokenizer is not None and template_handles_tools(tokenizer)
    if template == "model" and not handles:
        raise ValueError("chat_template: 'model' needs a tokenizer whose chat template reads "
                         "tools; this one's does not (use 'auto' or 'qwen3')")
    if template in ("qwen3", "qwen3-no-think") or not handles or (
            template == "auto" and is_qwen3_template(tokenizer)):
        return ChatRenderer(fmt or HERMES, "qwen3-layout", tokenizer, thinking=template != "qwen3-no-think")
    own = template_format(tokenizer)
    if fmt is None and own is None:
        raise ValueError("tool_format: the model's chat template handles tools in a format not "
                         "recognised here; name one (hermes, llama3.1-json) or set "
                         "chat_template = 'qwen3'")
    if fmt is not None and own is not None and fmt is not own:
        raise ValueError(f"tool_format: {fmt.name!r}, but the model's chat template writes "
                         f"{own.name} calls; leave tool_format 'auto' or set chat_template = "
                         "'qwen3' to render that format as text")
    # A template that writes think blocks (Qwen3's) has the model open its own.
    return ChatRenderer(fmt or own, "model-template", tokenizer,
                        thinking=qwen3.THINK_OPEN_TAG in tokenizer.chat_template)
