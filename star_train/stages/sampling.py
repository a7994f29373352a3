"""Sample completions of RL prompts and score them: what teacher rollouts and Sim-RL share.

Prompts go to ``generate`` in chunks of ``chunk_prompts`` (x ``num_samples`` sequences);
chunk ``c`` is sampled with ``seed_of(c)``, so the caller decides how seeds follow the
run's position and a resumed run re-samples identically. A completion is scored as the
response the model wrote: what its prompt already holds of the answer (the chat format's
``response_prefix``; Qwen3: the ``<think>\\n`` the prompt ends with) plus the decoded ids,
end-of-turn token included, read in the prompts' chat format (``RLPrompt.renderer``).

Under torchrun a caller may pass its ``World``: each rank then samples and scores every
``world_size``-th chunk (from its rank) on its own device, and an ``all_gather`` per round
of chunks gives every rank all the scored samples in the chunks' order
(``runtime.distributed.in_rounds``). A chunk's seed is its own, so the result is the one a
single process gets, whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..chat.templates import QWEN3
from ..data.prompts import RLPrompt
from ..reward import similarity_reward
from ..runtime.distributed import World, in_rounds
from ..runtime.generation import sample_completions


@dataclass
class ScoredSamples:
    prompt: RLPrompt
    completions: list[torch.Tensor]   # int64 [L_i]: sampled ids, up to and with the end token
    texts: list[str]                  # text_prefix + decoded completion: what was scored
    rewards: list[float]


def sample_and_score(model, tokenizer, prompts: list[RLPrompt], *, num_samples: int,
                     chunk_prompts: int, seed_of, temperature: float, max_new_tokens: int,
                     autocast, progress=None, text_prefix: str | None = None,
                     reward_rules: str | None = None, world=None) -> list[ScoredSamples]:
    """``num_samples`` scored completions of each prompt, in the prompts' order.
    ``progress`` (a tqdm bar) advances by the prompts of each finished chunk; without
    one a bar for this call alone is shown while it runs (on rank 0 only). ``text_prefix``:
    what goes in front of each decoded completion (default: the chat format's
    ``response_prefix``). Generation stops at the chat format's end token, and the reward
    reads the text in that format. ``world``: split the chunks over its ranks (see the
    module doc); every rank must call this with the same prompts."""
    chunks = [prompts[first:first + chunk_prompts]
              for first in range(0, len(prompts), chunk_prompts)]
    world = world or World()
    bar = progress or tqdm(total=sum(len(c) for c in world.share(chunks)), desc="sampling",
                           unit="prompt", leave=False, mininterval=2, disable=not world.is_main)

    def run(chunk: int) -> list[tuple]:
        members = chunks[chunk]
        renderer = members[0].renderer or QWEN3  # a prompt list is rendered in one format
        prefix = renderer.response_prefix if text_prefix is None else text_prefix
        sampled = sample_completions(
            model, [p.ids for p in members], num_samples, seed=seed_of(chunk),
            temperature=temperature, max_new_tokens=max_new_tokens,
            eos_id=tokenizer.convert_tokens_to_ids(renderer.end_token),
            pad_id=tokenizer.pad_token_id, autocast=autocast)
        rules = {} if reward_rules is None else {"rules": reward_rules}
        if not renderer.native:  # the Qwen3 format is scored as written (no fmt needed)
            rules["fmt"] = renderer
        scored = []
        for prompt, completions in zip(members, sampled):
            texts = [prefix + tokenizer.decode(c.tolist(), skip_special_tokens=False)
                     for c in completions]
            rewards = [float(similarity_reward(t, prompt.reference, prompt.tools, **rules))
                       for t in texts]
            scored.append((completions, texts, rewards))  # CPU tensors: cheap to gather
        bar.update(len(members))
        return scored

    results = [scored for _, scored in in_rounds(world, list(range(len(chunks))), run)]
    if progress is None:
        bar.close()
    return [ScoredSamples(prompt, *result) for members, scored in zip(chunks, results)
            for prompt, result in zip(members, scored)]
