"""Tokenized training examples: STAR records -> token ids with the target tokens marked.

An example is ``input_ids`` (prompt then target) and ``target_mask``, true on the target
tokens the model must learn to produce (never on the first token, which nothing
predicts). The teacher cache and the CKD loss both walk an example's target positions
in this order. ``pad_batch`` turns any such sequences (training examples, Sim-RL's
prompt + completion pairs) into one right-padded batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..chat.qwen3 import ASSISTANT_HEADER, END_OF_TURN, THINK_CLOSE_TAG, THINK_OPEN_TAG, render_assistant, render_prompt
from ..chat.templates import ChatRenderer
from ..chat.tokenizer import encode_example
from .records import build_example, load_records, validate_record

IGNORE = -100


@dataclass
class Example:
    index: int                # position in the dataset (the unit the schedule and cache use)
    record_id: str
    input_ids: torch.Tensor   # int32 [T]
    labels: torch.Tensor      # int32 [T], IGNORE on the prompt

    @property
    def target_mask(self) -> torch.Tensor:
        mask = self.labels != IGNORE
        mask[0] = False  # nothing predicts the first token
        return mask

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


FORMATS = ("released", "template")
MASKS = ("all", "think", "answer", "alter")


def released_pair(record: dict, add_reasoning: bool = False,
                  renderer: ChatRenderer | None = None) -> tuple[str, str]:
    """(prompt, target) as the released ``messages_to_trainset.py`` builds them: the prompt
    is the chat template's rendering of all but the last message (tools as given) with the
    generation prompt and ``<think>`` (no newline); the target is the last message rendered
    on its own (so without a think block) after ``</think>``, ending ``<|im_end|>\n``;
    with ``add_reasoning`` its ``reasoning_content`` goes before the ``</think>``.
    ``renderer``: a chat format in the Qwen3 layout with thinking (another tool-call format
    writes the tools and calls as its text); None is the Qwen3 format."""
    record = validate_record(record)
    messages, tools = record["messages"], record["tools"]
    if renderer is not None:
        if not (renderer.layout == "qwen3-layout" and renderer.thinking):
            raise ValueError(f"data.format: 'released' is the released Qwen3 layout's pair; the "
                             f"chat format {renderer.name!r} has no think block to open there "
                             "(use data.format 'template')")
        messages, tools = renderer.qwen3_inputs(messages, tools)
    prompt = render_prompt(messages[:-1], tools) + THINK_OPEN_TAG
    alone = render_assistant(messages[-1], after_last_query=False, is_last=True)
    target = THINK_CLOSE_TAG + alone[len(ASSISTANT_HEADER):]
    reasoning = messages[-1].get("reasoning_content")
    if add_reasoning and reasoning:
        target = reasoning + target
    return prompt, target


def _released_ids(tokenizer, prompt: str, target: str, max_prompt_length: int,
                  max_response_length: int) -> tuple[list[int], list[int]]:
    """Token ids as the released trainer makes them: each side truncated on the right to its
    limit (a long prompt loses its end, as there), the end-of-turn token appended to a
    target that does not end with it (so a full target ends "<|im_end|>\n<|im_end|>")."""
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt_length]
    target_ids = tokenizer.encode(target, add_special_tokens=False)[:max_response_length]
    if target_ids[-1] != eos:
        target_ids.append(eos)
    return prompt_ids, target_ids


def _restrict(target_ids: list[int], mask: str, index: int, think_close: int) -> list[bool]:
    """Which target tokens are distilled (``ckd.mask``): all; the reasoning up to and with
    the last ``</think>``; what follows it; or alternating by example (even: think)."""
    if mask == "alter":
        mask = "think" if index % 2 == 0 else "answer"
    if mask == "all":
        return [True] * len(target_ids)
    ends = [j for j, token in enumerate(target_ids) if token == think_close]
    if not ends:
        raise ValueError(f"example {index}: ckd.mask {mask!r} needs a </think> in the target")
    cut = ends[-1] + 1
    return [(j < cut) == (mask == "think") for j in range(len(target_ids))]


def load_examples(path: str, tokenizer, *, max_length: int = 5632, limit: int = 0,
                  fmt: str = "template", mask: str = "all", add_reasoning: bool = False,
                  max_prompt_length: int = 5120, max_response_length: int = 512,
                  log=None, renderer: ChatRenderer | None = None) -> list[Example]:
    """Tokenized examples of the STAR records in ``path``, in one of two formats:

    ``"released"``: the pair of ``released_pair`` with the released truncation
    (``_released_ids``); every record is kept.
    ``"template"``: the full Qwen3 template rendering (``build_example``: prompt ends
    ``<think>\n``, target = reasoning, ``</think>``, answer, ``<|im_end|>``). A record whose
    answer alone does not fit in ``max_length`` (with at least one prompt token) is
    skipped, not truncated: a cut answer would teach stopping mid-call. ``log`` receives
    the skip count.

    ``mask`` (``MASKS``) restricts the target tokens that are trained.
    ``renderer``: the model's chat format (``runtime.models.model_renderer``) that writes
    both kinds of pair; None is the Qwen3 format. (``fmt`` is the pair kind, not this.)
    """
    if fmt not in FORMATS or mask not in MASKS:
        raise ValueError(f"fmt must be one of {FORMATS} and mask one of {MASKS}, "
                         f"got {fmt!r}, {mask!r}")
    think_close = tokenizer.convert_tokens_to_ids(THINK_CLOSE_TAG)
    examples, skipped = [], 0
    for position, record in enumerate(load_records(path, limit)):
        if fmt == "released":
            prompt_ids, target_ids = _released_ids(
                tokenizer, *released_pair(record, add_reasoning, renderer), max_prompt_length,
                max_response_length)
            keep = _restrict(target_ids, mask, len(examples), think_close)
            labels = [IGNORE] * len(prompt_ids) + [t if k else IGNORE
                                                   for t, k in zip(target_ids, keep)]
            examples.append(Example(len(examples), str(record.get("id", position)),
                                    torch.as_tensor(prompt_ids + target_ids, dtype=torch.int32),
                                    torch.as_tensor(labels, dtype=torch.int32)))
            continue
        prompt, target = build_example(record, renderer)
        # The rendered turn ends "<|im_end|>\n"; generation stops at <|im_end|>, so the
        # newline after it is never produced and is not trained.
        target = target.removesuffix("\n")
        if len(tokenizer.encode(target, add_special_tokens=False)) >= max_length:
            skipped += 1
            continue
        enc = encode_example(tokenizer, prompt, target, max_length=max_length)
        labels = enc["labels"]
        if mask != "all":
            first = next(j for j, t in enumerate(labels) if t != IGNORE)
            keep = _restrict(labels[first:], mask, len(examples), think_close)
            labels = labels[:first] + [t if k else IGNORE for t, k in zip(labels[first:], keep)]
        # int32 halves the resident dataset (ids < 2^31); pad_batch widens to int64.
        examples.append(Example(len(examples), str(record.get("id", position)),
                                torch.as_tensor(enc["input_ids"], dtype=torch.int32),
                                torch.as_tensor(labels, dtype=torch.int32)))
    if skipped and log is not None:
        log(f"skipped {skipped} records whose answer exceeds data.max_length "
            f"({max_length} tokens)")
    return examples


def fingerprint(examples: list[Example]) -> str:
    """A digest of every token and label: covers the data, the renderer, the tokenizer
    and the truncation, so a teacher cache built for other inputs is never reused."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.input_ids.numpy().tobytes())
        digest.update(ex.labels.numpy().tobytes())
    return digest.hexdigest()[:32]


def pad_batch(sequences: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` ``[B, T]`` from
    ``(ids, target_mask)`` pairs. Right padding keeps each sequence at positions 0.. as an
    unpadded forward would see it."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (ids, mask) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        target_mask[row, :n] = mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def pack_batch(sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The sequences end to end in one row, padding-free: ``input_ids``, ``target_mask`` and
    ``position_ids`` ``[1, total]`` (positions restart at 0 for each sequence) and no
    ``attention_mask``. With restarting positions and no mask, transformers' attention
    keeps each sequence to itself (a block-diagonal causal mask from the positions).
    A sequence's first token is never a target, so no target is predicted across a
    boundary."""
    input_ids = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids, _ in sequences])
    target_mask = torch.cat([torch.as_tensor(mask, dtype=torch.bool) for _, mask in sequences])
    positions = torch.cat([torch.arange(len(ids)) for ids, _ in sequences])
    if any(bool(mask[0]) for _, mask in sequences):
        raise ValueError("pack_batch: a sequence's first token is a target; packing would "
                         "predict it from the previous sequence")
    return {"input_ids": input_ids[None], "attention_mask": None,
            "target_mask": target_mask[None], "position_ids": positions[None]}


def example_batch(examples: list[Example], pad_id: int, packed: bool = False) -> dict:
    """One batch of training examples: right-padded (``pad_batch``) or, with ``packed``,
    padding-free in one row (``pack_batch``)."""
    sequences = [(ex.input_ids, ex.target_mask) for ex in examples]
    return pack_batch(sequences) if packed else pad_batch(sequences, pad_id)
