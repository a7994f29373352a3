"""Tokenized training examples: STAR records -> (input_ids, labels) with the prompt masked.

Labels are aligned with ``input_ids`` (Hugging Face convention): ``labels[t]`` is the
token the model must predict at ``t`` from the prefix before it, ``-100`` on the prompt.
The *target positions* of an example are the ``t >= 1`` with ``labels[t] != -100``; the
teacher cache and the CKD loss both walk them in this order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .config import DataConfig
from .data import build_example, load_records
from .tokenizer import encode_example

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


def load_examples(cfg: DataConfig, tokenizer, log=None) -> list[Example]:
    """Tokenized examples of ``cfg.path``. A record whose answer alone does not fit in
    ``cfg.max_length`` (with at least one prompt token) is skipped, not truncated: a cut
    answer would teach stopping mid-call. ``log`` receives the skip count."""
    records = load_records(cfg.path, cfg.limit)
    examples, skipped = [], 0
    for position, record in enumerate(records):
        prompt, target = build_example(record)
        # The rendered turn ends "<|im_end|>\n"; generation stops at <|im_end|>, so the
        # newline after it is never produced and is not trained.
        target = target.removesuffix("\n")
        if len(tokenizer.encode(target, add_special_tokens=False)) >= cfg.max_length:
            skipped += 1
            continue
        enc = encode_example(tokenizer, prompt, target, max_length=cfg.max_length)
        # int32 halves the resident dataset (ids < 2^31); collate widens to int64.
        examples.append(Example(len(examples), str(record.get("id", position)),
                                torch.as_tensor(enc["input_ids"], dtype=torch.int32),
                                torch.as_tensor(enc["labels"], dtype=torch.int32)))
    if skipped and log is not None:
        log(f"skipped {skipped} records whose answer exceeds data.max_length "
            f"({cfg.max_length} tokens)")
    return examples


def fingerprint(examples: list[Example]) -> str:
    """A digest of every token and label: covers the data, the renderer, the tokenizer
    and the truncation, so a teacher cache built for other inputs is never reused."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.input_ids.numpy().tobytes())
        digest.update(ex.labels.numpy().tobytes())
    return digest.hexdigest()[:32]


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` ``[B, T]``."""
    width = max(len(ex.input_ids) for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    target_mask = torch.zeros((batch, width), dtype=torch.bool)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        attention_mask[row, :n] = 1
        target_mask[row, :n] = ex.target_mask
        labels[row, :n] = ex.labels
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "target_mask": target_mask, "labels": labels}


def target_hidden(hidden: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states that predict the target tokens, ``[num_targets, H]``, in the
    order of the target positions (row-major over the batch)."""
    return hidden[:, :-1][target_mask[:, 1:].to(hidden.device)]
