"""RL prompts: the rendered prompt of each STAR record with its reference answer.

Teacher rollouts and Sim-RL both sample completions of these prompts and score them with
the similarity reward against ``reference`` (the record's last message).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..chat.templates import ChatRenderer
from .records import build_example


@dataclass
class RLPrompt:
    index: int               # position in the prompt list (the unit a prompt stream draws)
    record_id: str
    ids: torch.Tensor        # int64 [P], the rendered prompt (Qwen3: ending with "<think>\n")
    reference: dict          # the record's last (assistant) message
    tools: list
    record_position: int     # the record's line among the loaded records
    # The chat format the prompt is written in: its completions are read (and scored) in
    # the same one. None: the Qwen3 format (``chat.templates.QWEN3``).
    renderer: ChatRenderer | None = None


def load_prompts(records: list[dict], max_prompt_length: int, tokenizer,
                 renderer: ChatRenderer | None = None) -> tuple[list[RLPrompt], int]:
    """The prompts of ``records`` that fit ``max_prompt_length`` and how many were skipped.
    ``renderer``: the model's chat format (``runtime.models.model_renderer``); None is the
    Qwen3 format, as before formats were a choice."""
    prompts, skipped = [], 0
    for position, record in enumerate(records):
        prompt_text, _ = build_example(record, renderer)
        ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        if len(ids) > max_prompt_length:
            skipped += 1  # never truncated: the tool list at the start is what the reward checks
            continue
        prompts.append(RLPrompt(len(prompts), str(record.get("id", position)),
                                torch.as_tensor(ids, dtype=torch.long),
                                record["messages"][-1], record["tools"], position, renderer))
    return prompts, skipped


def prompts_fingerprint(prompts: list[RLPrompt]) -> str:
    """A digest of the prompts' tokens and references: a resumed run must walk the
    same prompt list for its stream position to mean the same prompts."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.ids.numpy().tobytes())
        digest.update(json.dumps(prompt.reference, sort_keys=True).encode())
    return digest.hexdigest()[:32]
