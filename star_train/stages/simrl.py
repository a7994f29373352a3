"""STAR stage 2: Sim-RL (GRPO with the similarity reward) on one device.

``run_simrl(cfg)`` trains the policy (e.g. the CKD stage's ``final/`` folder) and can be
killed and restarted at any point. Each optimizer step:

1. draws prompts from a seeded stream (``train.episodes`` shuffled passes over the
   prompts, laid end to end: position ``p`` of the stream is a pure function of the
   seed and ``p``);
2. samples ``rollout.num_samples`` completions per prompt with ``generate`` (plain
   softmax sampling at ``rollout.temperature``, stopping at ``<|im_end|>``), seeded from
   (seed, step, round, chunk), so a resumed step samples exactly what an uninterrupted
   run sampled;
3. scores each completion with ``similarity_reward`` and drops groups whose mean reward
   is not strictly in (0.01, 0.99) (dynamic filtering); while fewer than
   ``rollout.prompts_per_step`` groups are kept, it draws the missing number of prompts
   again, for at most ``rollout.max_sampling_rounds`` rounds, then trains on what it has
   (no update at all when nothing was kept);
4. GRPO update: group-normalised advantages, reference log-probs from a frozen copy of
   the initial policy (under no_grad), loss = ``star_kernels.fused_linear_grpo_loss``
   (PPO clip, k2 KL; on-policy, so the op's own log-probs are the old ones) on the
   trunk's hidden states at the completion positions only: no ``[tokens x vocab]``
   logits, and no lm_head work on prompt tokens. Token mean over all of the step's
   completion tokens however they are split into micro-batches; AdamW; grad clipping;
5. logs the step to ``train_log.jsonl`` and checkpoints every ``train.save_every``
   steps (atomic; the stream position, which dynamic filtering moves by a variable
   amount, is part of the checkpoint state).

Parameters stay in fp32 (updates at lr 3e-7 vanish in bf16); ``train.dtype`` bfloat16
runs generation and the forward/backward passes under autocast. The policy samples in
eval mode and is trained in train mode: with dropout 0 (Qwen3's default) both are the
same function, so the training pass's log-probs are the sampling policy's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import star_kernels as sk
from star_kernels.hf import hidden_states

from .checkpoint import (append_log, latest_checkpoint, load_checkpoint, save_checkpoint,
                         truncate_log)
from .config import SimRLRunConfig
from .data import build_example, load_records
from .models import DTYPES, load_model, resolve_device
from .reward import group_advantages, keep_group, similarity_reward
from .schedule import BatchSchedule
from .stage import (enable_gradient_checkpointing, fused_op_dtype, open_run,
                    optimizer_and_scheduler)

THINK_OPEN = "<think>\n"  # the prompt ends with it, so the scored response starts with it
END_OF_TURN = "<|im_end|>"


# ---------------------------------------------------------------- prompts and the stream

@dataclass
class RLPrompt:
    index: int               # position in the prompt list (the unit the stream draws)
    record_id: str
    ids: torch.Tensor        # int64 [P], the rendered prompt ending with "<think>\n"
    reference: dict          # the record's last (assistant) message
    tools: list
    record_position: int     # the record's line among the loaded records


def load_prompts(records: list[dict], max_prompt_length: int,
                 tokenizer) -> tuple[list[RLPrompt], int]:
    """The prompts of ``records`` that fit ``max_prompt_length`` and how many were skipped."""
    prompts, skipped = [], 0
    for position, record in enumerate(records):
        prompt_text, _ = build_example(record)
        ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        if len(ids) > max_prompt_length:
            skipped += 1  # never truncated: the tool list at the start is what the reward checks
            continue
        prompts.append(RLPrompt(len(prompts), str(record.get("id", position)),
                                torch.as_tensor(ids, dtype=torch.long),
                                record["messages"][-1], record["tools"], position))
    return prompts, skipped


def prompts_fingerprint(prompts: list[RLPrompt]) -> str:
    """A digest of the prompts' tokens and references: a resumed run must walk the
    same prompt list for its stream position to mean the same prompts."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.ids.numpy().tobytes())
        digest.update(json.dumps(prompt.reference, sort_keys=True).encode())
    return digest.hexdigest()[:32]


class PromptStream:
    """Prompt indices in training order: ``episodes`` seeded permutations end to end.

    The same stream a :class:`BatchSchedule` with batch size 1 walks, so position ``p``
    is a pure function of (seed, number of prompts, ``p``). Dynamic filtering consumes
    a variable number of positions per step; the checkpoint stores where it stopped.
    """

    def __init__(self, num_prompts: int, episodes: int, seed: int):
        self._schedule = BatchSchedule(num_prompts, 1, episodes, seed)

    def __len__(self) -> int:
        return self._schedule.total_steps

    def take(self, position: int, count: int) -> list[int]:
        """Up to ``count`` indices from ``position`` on (fewer at the end of the stream)."""
        stop = min(position + count, len(self))
        return [self._schedule.batch(p)[0] for p in range(position, stop)]


# ---------------------------------------------------------------- rollouts

@dataclass
class PromptGroup:
    """One prompt's group of sampled completions, as the step saw it."""

    prompt_index: int
    prompt_ids: torch.Tensor               # int64 [P]
    completions: list[torch.Tensor]        # int64 [L_i]: sampled ids, up to and with <|im_end|>
    texts: list[str]                       # "<think>\n" + decoded completion: what was scored
    rewards: list[float]
    kept: bool                             # passed the dynamic filter
    sampling_round: int
    advantages: list[float] | None = None  # kept groups only
    old_logprobs: list[torch.Tensor] | None = None  # [L_i] float32 each, kept groups only
    ref_logprobs: list[torch.Tensor] | None = None


@dataclass
class StepReport:
    """What ``on_step_end(step, report)`` receives: the logged record and every group
    sampled in the step (dropped ones included), in sampling order."""

    step: int
    record: dict
    groups: list[PromptGroup]


def sampling_seed(seed: int, step: int, sampling_round: int, chunk: int) -> int:
    """A 63-bit torch seed per generate() call: a resumed step re-samples identically."""
    key = f"simrl/{seed}/{step}/{sampling_round}/{chunk}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def _plain_sampling_config(temperature, max_new_tokens, eos_id, pad_id):
    """Keyword arguments for ``generate`` that sample from softmax(logits / temperature)
    and nothing else. A model folder's own generation_config (Qwen3 ships top_k=20,
    top_p=0.95, temperature 0.6) would otherwise fill every unset knob: the PPO ratio
    and the KL assume the samples come from the policy's own distribution."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                            pad_token_id=pad_id)


@torch.no_grad()
def generate_completions(policy, prompt_ids: list[torch.Tensor], num_samples: int, *,
                         seed: int, temperature: float, max_new_tokens: int, eos_id: int,
                         pad_id: int, autocast) -> list[list[torch.Tensor]]:
    """``num_samples`` sampled completions per prompt (one generate call, prompts
    left-padded); each completion ends at its first ``eos_id`` (kept) or at
    ``max_new_tokens``. Returns CPU tensors, one list per prompt."""
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    input_ids = input_ids.repeat_interleave(num_samples, 0).to(device)
    attention_mask = attention_mask.repeat_interleave(num_samples, 0).to(device)

    policy.eval()  # sampling is the deployed policy: no dropout
    own_config = policy.generation_config
    policy.generation_config = GenerationConfig()  # nothing inherited from the model folder
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), autocast:
            torch.manual_seed(seed)
            sequences = policy.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                generation_config=_plain_sampling_config(temperature, max_new_tokens,
                                                         eos_id, pad_id))
    finally:
        policy.generation_config = own_config
    new_tokens = sequences[:, width:].cpu()
    completions = []
    for row in new_tokens:
        ends = (row == eos_id).nonzero()
        completions.append(row[:int(ends[0]) + 1] if len(ends) else row)
    return [completions[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]


def sample_round(policy, tokenizer, prompts: list[RLPrompt], indices: list[int], cfg,
                 step: int, sampling_round: int, autocast) -> list[PromptGroup]:
    """Sample, decode and score one group per index in ``indices``; set ``kept``."""
    r = cfg.rollout
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    groups = []
    for chunk, first in enumerate(range(0, len(indices), r.generate_batch_prompts)):
        chunk_prompts = [prompts[i] for i in indices[first:first + r.generate_batch_prompts]]
        sampled = generate_completions(
            policy, [p.ids for p in chunk_prompts], r.num_samples,
            seed=sampling_seed(cfg.train.seed, step, sampling_round, chunk),
            temperature=r.temperature, max_new_tokens=r.max_new_tokens, eos_id=eos_id,
            pad_id=tokenizer.pad_token_id, autocast=autocast)
        for prompt, completions in zip(chunk_prompts, sampled):
            texts = [THINK_OPEN + tokenizer.decode(c.tolist(), skip_special_tokens=False)
                     for c in completions]
            rewards = [float(similarity_reward(t, prompt.reference, prompt.tools))
                       for t in texts]
            groups.append(PromptGroup(prompt.index, prompt.ids, completions, texts, rewards,
                                      keep_group(rewards), sampling_round))
    return groups


def collect_groups(policy, tokenizer, prompts, stream: PromptStream, position: int, cfg,
                   step: int, autocast) -> tuple[list[PromptGroup], int, int]:
    """Dynamic filtering: sample rounds until ``prompts_per_step`` groups are kept, the
    round limit is hit or the stream ends. Returns (every sampled group, the new stream
    position, the number of rounds)."""
    wanted = cfg.rollout.prompts_per_step
    groups: list[PromptGroup] = []
    rounds = 0
    while rounds < cfg.rollout.max_sampling_rounds:
        missing = wanted - sum(g.kept for g in groups)
        indices = stream.take(position, missing)
        if missing == 0 or not indices:
            break
        position += len(indices)
        groups += sample_round(policy, tokenizer, prompts, indices, cfg, step, rounds, autocast)
        rounds += 1
    return groups, position, rounds


# ---------------------------------------------------------------- the GRPO update

def pack_sequences(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    """Right-padded prompt+completion ``input_ids``, ``attention_mask`` and
    ``completion_mask`` ``[B, T]`` (true on the sampled tokens). Right padding keeps
    each sequence at positions 0.. as an unpadded forward would see it."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(rows):
        p, n = len(prompt), len(prompt) + len(completion)
        input_ids[row, :p], input_ids[row, p:n] = prompt, completion
        attention_mask[row, :n] = 1
        completion_mask[row, p:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}


def completion_rows(model, batch: dict, device, autocast):
    """(hidden rows predicting each completion token [N, H], lm_head weight and bias in
    the rows' dtype, the completion token ids [N]); rows in row-major order."""
    with autocast:
        hidden, weight, bias = hidden_states(model, batch["input_ids"].to(device),
                                             batch["attention_mask"].to(device))
        dtype = fused_op_dtype(hidden)
    predicts = batch["completion_mask"][:, 1:].to(device)  # hidden at t-1 predicts token t
    rows = hidden[:, :-1][predicts].to(dtype)
    ids = batch["input_ids"][:, 1:].to(device)[predicts]
    weight = weight.to(dtype)  # the fused ops want one dtype; grads still reach fp32
    bias = bias.to(dtype) if bias is not None else None
    return rows, weight, bias, ids


@torch.no_grad()
def completion_logprobs(model, batch: dict, device, autocast, temperature: float):
    """float32 log-probs [N] of the completion tokens under ``model``."""
    rows, weight, bias, ids = completion_rows(model, batch, device, autocast)
    return sk.fused_linear_logprobs(rows, weight, ids, temperature=temperature, bias=bias)


def grpo_update(policy, reference, optimizer, groups: list[PromptGroup], cfg, device,
                autocast, pad_id: int) -> dict:
    """One optimizer step on the kept groups; fills their old/ref log-probs.

    Each micro-batch's loss is ``fused_linear_grpo_loss``'s token mean over its own
    completion tokens; scaling it by (its tokens / the step's tokens) makes the
    accumulated gradient that of the token mean over the whole step.
    """
    g = cfg.grpo
    rows, owners = [], []
    for group in groups:
        group.old_logprobs, group.ref_logprobs = [], []
        for completion, advantage in zip(group.completions, group.advantages):
            rows.append((group.prompt_ids, completion, advantage))
            owners.append(group)
    total_tokens = sum(len(c) for _, c, _ in rows)
    micro = cfg.train.micro_batch_size
    optimizer.zero_grad(set_to_none=True)
    loss_sum = kl_sum = clip_sum = 0.0
    for first in range(0, len(rows), micro):
        part = rows[first:first + micro]
        batch = pack_sequences([(p, c) for p, c, _ in part], pad_id)
        lengths = [len(c) for _, c, _ in part]
        share = sum(lengths) / total_tokens
        ref = completion_logprobs(reference, batch, device, autocast, cfg.rollout.temperature)
        policy.train()
        hidden, weight, bias, ids = completion_rows(policy, batch, device, autocast)
        advantages = torch.tensor([a for _, _, a in part], dtype=torch.float32,
                                  device=device).repeat_interleave(
                                      torch.tensor(lengths, device=device))
        # One update per sampled batch, so the behaviour policy is the current one:
        # old_logprobs=None (ratio exp(logp - logp.detach())) gives the same loss and
        # gradient as passing them, and the op returns them without a second forward.
        loss, stats = sk.fused_linear_grpo_loss(
            hidden, weight, ids, advantages, torch.ones_like(ids, dtype=torch.bool),
            old_logprobs=None, ref_logprobs=ref, clip_eps=g.clip_eps, kl_coef=g.kl_coef,
            kl_estimator=g.kl_estimator, temperature=cfg.rollout.temperature, bias=bias,
            loss_agg="token_mean")
        (loss * share).backward()
        loss_sum += loss.item() * share
        kl_sum += stats["mean_kl"].item() * share
        clip_sum += stats["clip_fraction"].item() * share
        old = stats["logprobs"].float().cpu()
        for owner, o, r in zip(owners[first:first + micro], old.split(lengths),
                               ref.cpu().split(lengths)):
            owner.old_logprobs.append(o)
            owner.ref_logprobs.append(r)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    return {"loss": loss_sum, "kl": kl_sum, "clip_fraction": clip_sum,
            "grad_norm": float(grad_norm), "completion_tokens": total_tokens}


# ---------------------------------------------------------------- the stage

def _step_record(step, groups, kept, update, position, consumed, rounds, lr, seconds) -> dict:
    rewards = [r for g in groups for r in g.rewards]
    kept_rewards = [r for g in kept for r in g.rewards]
    eos_free = sum(1 for g in groups for t in g.texts if not t.endswith(END_OF_TURN))
    return {
        "step": step,
        "reward_mean": sum(rewards) / len(rewards),
        "kept_reward_mean": sum(kept_rewards) / len(kept_rewards) if kept else None,
        "groups_sampled": len(groups), "groups_kept": len(kept),
        "kept_fraction": len(kept) / len(groups),
        "prompts_consumed": consumed, "sampling_rounds": rounds, "stream_position": position,
        "completion_tokens": update["completion_tokens"] if update else 0,
        "truncated_fraction": eos_free / len(rewards),  # hit max_new_tokens before <|im_end|>
        "loss": update["loss"] if update else None,
        "kl": update["kl"] if update else None,
        "clip_fraction": update["clip_fraction"] if update else None,
        "grad_norm": update["grad_norm"] if update else None,
        "updated": update is not None, "lr": lr,
        "prompts": [g.prompt_index for g in groups],
        "kept_prompts": [g.prompt_index for g in kept],
        "seconds": round(seconds, 3),
    }


def run_simrl(cfg: SimRLRunConfig, *, tokenizer=None, on_step_end=None, log=print) -> dict:
    """Run (or resume) the Sim-RL stage; returns a summary. ``on_step_end(step, report)``
    is called after each step (and its checkpoint, if one was due) with a
    :class:`StepReport`."""
    cfg.validate()
    from .tokenizer import qwen3_tokenizer

    tokenizer = tokenizer or qwen3_tokenizer()
    device = resolve_device(cfg.train.device)
    compute_dtype = DTYPES[cfg.train.dtype]
    out = open_run(cfg)

    prompts, skipped = load_prompts(load_records(cfg.data.path, cfg.data.limit),
                                    cfg.data.max_prompt_length, tokenizer)
    log(f"{len(prompts)} prompts; skipped {skipped} longer than "
        f"{cfg.data.max_prompt_length} tokens")
    per_step = cfg.rollout.prompts_per_step
    if len(prompts) * cfg.train.episodes < per_step:
        raise ValueError(f"rollout.prompts_per_step {per_step} exceeds the "
                         f"{len(prompts)} usable prompts x {cfg.train.episodes} episodes")
    stream = PromptStream(len(prompts), cfg.train.episodes, cfg.train.seed)

    policy = load_model(cfg.policy.model, torch.float32, device)
    if policy.config.vocab_size < len(tokenizer):
        raise ValueError(f"policy vocab_size {policy.config.vocab_size} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens")
    # The KL anchor is the initial policy, also after a resume (the checkpoint only
    # overwrites the policy below). Held in the compute dtype: it is only ever run under
    # autocast, whose matmuls see bf16 weights either way, and fp32 would double its memory.
    reference = copy.deepcopy(policy).to(compute_dtype).eval().requires_grad_(False)
    if cfg.policy.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    optimizer, scheduler = optimizer_and_scheduler(policy, cfg.train)

    run_key = {"prompts_fingerprint": prompts_fingerprint(prompts),
               "episodes": cfg.train.episodes, "seed": cfg.train.seed}
    ckpt_root, log_path = out / "checkpoints", out / "train_log.jsonl"
    step, position = 0, 0
    if (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ckpt, policy, optimizer, scheduler, run=run_key)
        step, position = state["step"], state["stream_position"]
        log(f"resumed from {ckpt} at step {step}, stream position {position}")
    start = step
    truncate_log(log_path, start)

    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if compute_dtype != torch.float32 else nullcontext())
    max_steps = cfg.train.max_steps or math.inf
    saved_at = start
    # A step starts only while a full first round of prompts is left in the stream.
    while step < max_steps and position + per_step <= len(stream):
        t0 = time.perf_counter()
        groups, new_position, rounds = collect_groups(policy, tokenizer, prompts, stream,
                                                      position, cfg, step, autocast)
        kept = [g for g in groups if g.kept]
        for group in kept:
            group.advantages = group_advantages(group.rewards, cfg.rollout.num_samples)
        update = None
        if kept:
            update = grpo_update(policy, reference, optimizer, kept, cfg, device, autocast,
                                 tokenizer.pad_token_id)
        with warnings.catch_warnings():  # a step without an update still advances the lr
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        step += 1
        record = _step_record(step, groups, kept, update, new_position,
                              new_position - position, rounds, scheduler.get_last_lr()[0],
                              time.perf_counter() - t0)
        position = new_position
        append_log(log_path, record)
        if step % cfg.train.log_every == 0:
            log(_summary_line(record))
        if step % cfg.train.save_every == 0:
            _save(ckpt_root, step, policy, optimizer, scheduler, position, cfg, run_key)
            saved_at = step
        if on_step_end is not None:
            on_step_end(step, StepReport(step, record, groups))
    if step != saved_at:
        _save(ckpt_root, step, policy, optimizer, scheduler, position, cfg, run_key)

    final = out / "final"
    policy.save_pretrained(final)
    tokenizer.save_pretrained(final)
    log(f"saved the policy to {final}")
    return {"steps": step, "start_step": start, "stream_position": position,
            "skipped_prompts": skipped, "num_prompts": len(prompts), "model_dir": str(final)}


def _save(root, step, policy, optimizer, scheduler, position, cfg, run_key):
    save_checkpoint(root, step, policy, optimizer, scheduler,
                    {"stream_position": position, "run": run_key},
                    keep=cfg.train.keep_checkpoints)


def _summary_line(record: dict) -> str:
    line = (f"step {record['step']}  reward {record['reward_mean']:.3f}  kept "
            f"{record['groups_kept']}/{record['groups_sampled']}  prompts "
            f"{record['prompts_consumed']}")
    if record["updated"]:
        line += (f"  loss {record['loss']:.4f}  kl {record['kl']:.2e}  clip "
                 f"{record['clip_fraction']:.3f}  tokens {record['completion_tokens']}")
    else:
        line += "  no group kept: no update"
    return line
