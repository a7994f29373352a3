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

from ..chat.tokenizer import encode_example
from .records import build_example, load_records

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


def load_examples(path: str, tokenizer, *, max_length: int, limit: int = 0,
                  log=None) -> list[Example]:
    """Tokenized examples of the STAR records in ``path``. A record whose answer alone does
    not fit in ``max_length`` (with at least one prompt token) is skipped, not truncated:
    a cut answer would teach stopping mid-call. ``log`` receives the skip count."""
    examples, skipped = [], 0
    for position, record in enumerate(load_records(path, limit)):
        prompt, target = build_example(record)
        # The rendered turn ends "<|im_end|>\n"; generation stops at <|im_end|>, so the
        # newline after it is never produced and is not trained.
        target = target.removesuffix("\n")
        if len(tokenizer.encode(target, add_special_tokens=False)) >= max_length:
            skipped += 1
            continue
        enc = encode_example(tokenizer, prompt, target, max_length=max_length)
        # int32 halves the resident dataset (ids < 2^31); pad_batch widens to int64.
        examples.append(Example(len(examples), str(record.get("id", position)),
                                torch.as_tensor(enc["input_ids"], dtype=torch.int32),
                                torch.as_tensor(enc["labels"], dtype=torch.int32)))
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


def example_batch(examples: list[Example], pad_id: int) -> dict:
    """One right-padded batch of training examples (see ``pad_batch``)."""
    return pad_batch([(ex.input_ids, ex.target_mask) for ex in examples], pad_id)
