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
from dataclasses import dataclass

import torch

import star_kernels as sk

from ..chat.qwen3 import END_OF_TURN
from ..data.examples import pad_batch
from ..data.prompts import load_prompts, prompts_fingerprint
from ..data.records import load_records
from ..reward import group_advantages, keep_group
from ..runtime.config import ModelSpec, TrainConfig, enforce, section, setting
from ..runtime.generation import derived_seed
from ..runtime.models import predicting_rows
from ..runtime.run_folder import open_run
from ..runtime.schedule import PromptStream
from ..runtime.trainer import StepPlan, Trainer
from .sampling import sample_and_score

# ---------------------------------------------------------------- config

@dataclass
class SimRLDataConfig:
    path: str = setting("", path=True)   # STAR jsonl (the last message is the reference)
    max_prompt_length: int = setting(5120, min=1)  # longer prompts are skipped (counted)
    limit: int = setting(0, min=0)       # use only the first N records (0 = all)


@dataclass
class PolicyConfig:
    model: ModelSpec = section(ModelSpec)  # e.g. the CKD stage's final/ folder
    gradient_checkpointing: bool = True


@dataclass
class RolloutConfig:
    num_samples: int = setting(8, min=2)       # the GRPO group (advantages need a spread)
    prompts_per_step: int = setting(32, min=1)  # kept groups wanted per step (not in STAR.md)
    max_sampling_rounds: int = setting(4, min=1)  # dynamic filtering: refill rounds per step
    max_new_tokens: int = setting(512, min=1)
    temperature: float = setting(1.0, above=0)
    generate_batch_prompts: int = setting(8, min=1)  # prompts per generate() (x num_samples)


@dataclass
class GRPOConfig:
    clip_eps: float = setting(0.2, min=0)
    kl_coef: float = setting(1e-3, min=0)
    kl_estimator: str = setting("k2", choices=("k1", "k2", "k3"))


@dataclass
class SimRLTrainConfig(TrainConfig):
    out_dir: str = setting("runs/simrl", path=True)
    lr: float = setting(3e-7, above=0)
    micro_batch_size: int = setting(8, min=1)
    save_every: int = setting(20, min=1)
    episodes: int = setting(3, min=1)     # passes over the prompts; max_steps stops earlier


@dataclass
class SimRLRunConfig:
    data: SimRLDataConfig = section(SimRLDataConfig)
    policy: PolicyConfig = section(PolicyConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    train: SimRLTrainConfig = section(SimRLTrainConfig)

    def validate(self) -> "SimRLRunConfig":
        enforce(self, [(self.data.path, "data.path must name a STAR jsonl file")],
                {"policy": self.policy.model})
        return self


# ---------------------------------------------------------------- sampling and filtering

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


def sampling_seed(seed: int, step: int, sampling_round: int, chunk: int) -> int:
    """The seed of one generate() call: a resumed step re-samples identically."""
    return derived_seed("simrl", seed, step, sampling_round, chunk)


def sample_round(policy, tokenizer, prompts, indices: list[int], cfg, step: int,
                 sampling_round: int, autocast) -> list[PromptGroup]:
    """Sample, decode and score one group per index in ``indices``; set ``kept``."""
    r = cfg.rollout
    scored = sample_and_score(
        policy, tokenizer, [prompts[i] for i in indices], num_samples=r.num_samples,
        chunk_prompts=r.generate_batch_prompts,
        seed_of=lambda chunk: sampling_seed(cfg.train.seed, step, sampling_round, chunk),
        temperature=r.temperature, max_new_tokens=r.max_new_tokens, autocast=autocast)
    return [PromptGroup(s.prompt.index, s.prompt.ids, s.completions, s.texts, s.rewards,
                        keep_group(s.rewards), sampling_round) for s in scored]


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


# ---------------------------------------------------------------- the stage

@dataclass
class _Rows:
    """One micro-batch of the update: completions with their advantages and owners."""

    prompts: list[torch.Tensor]
    completions: list[torch.Tensor]
    advantages: list[float]
    owners: list[PromptGroup]


class SimRLStage:
    """One optimizer step = sample until enough groups pass the filter, then one GRPO
    update on the kept groups' completion tokens, in micro-batches."""

    name = "simrl"
    total_steps = None  # until the prompt stream cannot fill another step

    def __init__(self, cfg: SimRLRunConfig, trainer: Trainer, prompts, skipped: int):
        self.cfg, self.trainer, self.prompts = cfg, trainer, prompts
        self.tokenizer = trainer.tokenizer
        self.stream = PromptStream(len(prompts), cfg.train.episodes, cfg.train.seed)
        self.position = 0
        self.run_key = {"prompts_fingerprint": prompts_fingerprint(prompts),
                        "episodes": cfg.train.episodes, "seed": cfg.train.seed}
        # The KL anchor is the initial policy, also after a resume (the checkpoint only
        # overwrites the policy). Held in the compute dtype: it only ever runs under
        # autocast, whose matmuls see bf16 weights either way; fp32 would double its memory.
        self.reference = copy.deepcopy(trainer.model).to(trainer.compute_dtype)
        self.reference.eval().requires_grad_(False)

    def plan_step(self, step: int) -> StepPlan | None:
        per_step = self.cfg.rollout.prompts_per_step
        if self.position + per_step > len(self.stream):
            return None  # a step starts only while a full first round is left in the stream
        groups, position, rounds = collect_groups(
            self.trainer.model, self.tokenizer, self.prompts, self.stream, self.position,
            self.cfg, step, self.trainer.autocast())
        consumed, self.position = position - self.position, position
        kept = [g for g in groups if g.kept]
        micro_batches = self._micro_batches(kept)
        tokens = sum(len(c) for g in kept for c in g.completions)
        return StepPlan(micro_batches, tokens,
                        _sampling_record(groups, kept, position, consumed, rounds, tokens),
                        detail=groups)

    def _micro_batches(self, kept: list[PromptGroup]) -> list[_Rows]:
        rows = []
        for group in kept:
            group.advantages = group_advantages(group.rewards, self.cfg.rollout.num_samples)
            group.old_logprobs, group.ref_logprobs = [], []
            rows += [(group.prompt_ids, c, a, group)
                     for c, a in zip(group.completions, group.advantages)]
        micro = self.cfg.train.micro_batch_size
        return [_Rows(*map(list, zip(*rows[i:i + micro]))) for i in range(0, len(rows), micro)]

    def micro_loss(self, policy, rows: _Rows):
        g, device = self.cfg.grpo, self.trainer.device
        batch = pad_batch([(torch.cat([p, c]), torch.arange(len(p) + len(c)) >= len(p))
                           for p, c in zip(rows.prompts, rows.completions)],
                          self.tokenizer.pad_token_id)
        lengths = [len(c) for c in rows.completions]
        with torch.no_grad():
            r_rows, ids, r_weight, r_bias = predicting_rows(self.reference, batch, device)
            ref = sk.fused_linear_logprobs(r_rows, r_weight, ids, bias=r_bias,
                                           temperature=self.cfg.rollout.temperature)
        hidden, _, weight, bias = predicting_rows(policy, batch, device)
        advantages = torch.tensor(rows.advantages, dtype=torch.float32, device=device)
        advantages = advantages.repeat_interleave(torch.tensor(lengths, device=device))
        # One update per sampled batch, so the behaviour policy is the current one:
        # old_logprobs=None (ratio exp(logp - logp.detach())) gives the same loss and
        # gradient as passing them, and the op returns them without a second forward.
        loss, stats = sk.fused_linear_grpo_loss(
            hidden, weight, ids, advantages, torch.ones_like(ids, dtype=torch.bool),
            old_logprobs=None, ref_logprobs=ref, clip_eps=g.clip_eps, kl_coef=g.kl_coef,
            kl_estimator=g.kl_estimator, temperature=self.cfg.rollout.temperature, bias=bias,
            loss_agg="token_mean")
        for owner, old, r in zip(rows.owners, stats["logprobs"].float().cpu().split(lengths),
                                 ref.float().cpu().split(lengths)):
            owner.old_logprobs.append(old)
            owner.ref_logprobs.append(r)
        n = sum(lengths)  # the skeleton wants sums over the micro-batch's tokens
        return loss * n, {"kl": stats["mean_kl"].item() * n,
                          "clip_fraction": stats["clip_fraction"].item() * n}

    def state(self) -> dict:
        return {"stream_position": self.position}

    def restore(self, state: dict) -> None:
        self.position = state["stream_position"]

    def describe(self, record: dict) -> str:
        line = (f"reward {record['reward_mean']:.3f}  kept {record['groups_kept']}/"
                f"{record['groups_sampled']}  prompts {record['prompts_consumed']}")
        if record["updated"]:
            return line + (f"  loss {record['loss']:.4f}  kl {record['kl']:.2e}  clip "
                           f"{record['clip_fraction']:.3f}  tokens {record['completion_tokens']}")
        return line + "  no group kept: no update"


def _sampling_record(groups, kept, position, consumed, rounds, tokens) -> dict:
    rewards = [r for g in groups for r in g.rewards]
    kept_rewards = [r for g in kept for r in g.rewards]
    eos_free = sum(1 for g in groups for t in g.texts if not t.endswith(END_OF_TURN))
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "kept_reward_mean": sum(kept_rewards) / len(kept_rewards) if kept else None,
        "groups_sampled": len(groups), "groups_kept": len(kept),
        "kept_fraction": len(kept) / len(groups),
        "prompts_consumed": consumed, "sampling_rounds": rounds, "stream_position": position,
        "completion_tokens": tokens,
        "truncated_fraction": eos_free / len(rewards),  # hit max_new_tokens before <|im_end|>
        "kl": None, "clip_fraction": None,
        "prompts": [g.prompt_index for g in groups],
        "kept_prompts": [g.prompt_index for g in kept],
    }


def run_simrl(cfg: SimRLRunConfig, *, tokenizer=None, on_step_end=None, log=print) -> dict:
    """Run (or resume) the Sim-RL stage; returns a summary. ``on_step_end(step, report)``
    is called after each step (and its checkpoint, if one was due); ``report.detail``
    holds every group sampled in the step (dropped ones included), in sampling order."""
    cfg.validate()
    if tokenizer is None:
        from ..chat.tokenizer import qwen3_tokenizer

        tokenizer = qwen3_tokenizer()
    out = open_run(cfg.train.out_dir, cfg)
    prompts, skipped = load_prompts(load_records(cfg.data.path, cfg.data.limit),
                                    cfg.data.max_prompt_length, tokenizer)
    log(f"{len(prompts)} prompts; skipped {skipped} longer than "
        f"{cfg.data.max_prompt_length} tokens")
    per_step = cfg.rollout.prompts_per_step
    if len(prompts) * cfg.train.episodes < per_step:
        raise ValueError(f"rollout.prompts_per_step {per_step} exceeds the "
                         f"{len(prompts)} usable prompts x {cfg.train.episodes} episodes")
    trainer = Trainer(cfg.train, cfg.policy.model, out, tokenizer=tokenizer,
                      gradient_checkpointing=cfg.policy.gradient_checkpointing,
                      role="policy", log=log)
    stage = SimRLStage(cfg, trainer, prompts, skipped)
    summary = trainer.fit(stage, on_step_end)
    return {**summary, "stream_position": stage.position, "skipped_prompts": skipped,
            "num_prompts": len(prompts)}
