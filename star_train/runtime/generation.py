"""Seeded sampling with Hugging Face ``generate``, shared by teacher rollouts and Sim-RL.

Every ``generate`` call gets its own seed derived from the run's seed and where the call
sits in the run (``derived_seed``), so a resumed run re-samples exactly what an
uninterrupted one sampled. Sampling is from the plain softmax at the given temperature:
a model folder's own generation defaults (Qwen3 ships top_k=20, top_p=0.95, temperature
0.6) are never applied, because the PPO ratio and the KL assume the samples come from
the policy's own distribution.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts) -> int:
    """A 63-bit torch seed from ``parts`` (e.g. ``("simrl", seed, step, round, chunk)``)."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, width]`` with each row right-aligned: what
    ``generate`` wants, so every row's new tokens start at column ``width``."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _plain_sampling_config(temperature, max_new_tokens, eos_id, pad_id):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                            pad_token_id=pad_id)


@torch.no_grad()
def sample_completions(model, prompt_ids: list[torch.Tensor], num_samples: int, *,
                       seed: int, temperature: float, max_new_tokens: int, eos_id: int,
                       pad_id: int, autocast) -> list[list[torch.Tensor]]:
    """``num_samples`` sampled completions per prompt (one generate call, prompts
    left-padded); each completion ends at its first ``eos_id`` (kept) or at
    ``max_new_tokens``. Returns CPU tensors, one list per prompt."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    width = input_ids.shape[1]
    input_ids = input_ids.repeat_interleave(num_samples, 0).to(device)
    attention_mask = attention_mask.repeat_interleave(num_samples, 0).to(device)

    model.eval()  # sampling is the deployed policy: no dropout
    own_config = model.generation_config
    model.generation_config = GenerationConfig()  # nothing inherited from the model folder
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), autocast:
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                generation_config=_plain_sampling_config(temperature, max_new_tokens,
                                                         eos_id, pad_id))
    finally:
        model.generation_config = own_config
    completions = []
    for row in sequences[:, width:].cpu():
        ends = (row == eos_id).nonzero()
        completions.append(row[:int(ends[0]) + 1] if len(ends) else row)
    return [completions[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]
