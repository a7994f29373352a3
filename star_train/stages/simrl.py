"""STAR stage 2: Sim-RL (GRPO with the similarity reward), on one device or data-parallel.

``run_simrl(cfg)`` trains the policy (e.g. the CKD stage's ``final/`` folder) and can be
killed and restarted at any point. As released (OpenRLHF's PPO loop with STAR's flags):

1. a rollout draws prompts from a seeded stream (``train.episodes`` shuffled passes over
   the prompts, laid end to end: position ``p`` is a pure function of the seed and
   ``p``) and samples ``rollout.num_samples`` completions per prompt with ``generate``
   (plain softmax at ``rollout.temperature``, stopping at ``<|im_end|>``), seeded from
   (seed, step, round, chunk), so a resumed run samples exactly what an uninterrupted
   one sampled;
2. each completion is scored with ``similarity_reward``; dynamic filtering
   (``reward.keep_group``) drops groups that are all right or all wrong, and prompts are
   drawn again until ``rollout.prompts_per_rollout`` groups are kept (at most
   ``rollout.max_sampling_rounds`` rounds, a safety valve that is logged when hit);
3. group-normalised advantages; reference log-probs from a frozen copy of the initial
   policy and the sampling policy's own log-probs are recorded for every kept
   completion before any update;
4. the rollout feeds optimizer steps of ``train.samples_per_step`` completions (PPO
   mini-batches, a seeded shuffle per pass, ``train.max_epochs`` passes), each with loss
   ``star_kernels.fused_linear_grpo_loss`` (PPO clip against the recorded log-probs, k2
   KL to the reference) on the trunk's hidden states at the completion positions only:
   no ``[tokens x vocab]`` logits, no lm_head work on prompt tokens;
5. the training skeleton logs each step and checkpoints between rollouts (the stream
   position, which dynamic filtering moves by a variable amount, is in the checkpoint).

``train.packing`` (the CKD key, off by default) puts each micro-batch's prompt + completion
sequences in one padding-free row (``data.examples.pack_batch``: positions restart per
sequence, no attention mask) for the loss forward and for the recorded log-probs: the
same target rows in the same order, without the padding's compute (flash-attention's
variable-length kernels on CUDA, see ``runtime.speedups``).

Under torchrun (``torchrun --nproc-per-node N -m star_train simrl --config ...``) the run
is data-parallel and trains what one process trains: each sampling round's generate()
chunks go round-robin to the ranks (a chunk's seed is its own), each rank samples and
scores its chunks on its own device, and one ``all_gather`` gives every rank every scored
group in chunk order, so every rank holds the whole rollout and takes the same filtering
decisions; the recorded log-probs' micro-batches are split and gathered the same way (a
micro-batch is computed as one process computes it); the updates go through the
trainer's split of each step's micro-batches, and rank 0 alone logs and writes. With
on-policy updates (``samples_per_step = 0``, one epoch) a group's ``old_logprobs`` in
``on_step_end``'s detail hold only the micro-batches this rank trained. FSDP2 is refused
(``train.data_parallel = "fsdp2"``): the ranks' generate() calls differ in number and
length, while FSDP2's all-gathers need every rank in every forward.

(Over 400 lines: the stage's rollout, its recorded log-probs and its loss share the
sample records defined here; splitting them apart would pass those around.)

On-policy KD (``grpo.op_kl_coef`` > 0, off by default and in both released scripts): the
teacher (``teacher.model``) stays loaded, frozen, in the compute dtype; its log-probs of
every kept completion's sampled tokens are recorded with the reference ones (trunk hidden
states + ``fused_linear_logprobs``: no teacher logits), and each micro-batch's loss adds
``op_kl_coef`` x the token mean of the ``grpo.op_kl_estimator`` estimate of
KL(student || teacher) on those tokens, as the released trainer's ``op_kl`` term does.

Parameters stay in fp32 (updates at lr 3e-7 vanish in bf16); ``train.dtype`` bfloat16
runs generation and the forward/backward passes under autocast. The policy samples in
eval mode and is trained in train mode: with dropout 0 (Qwen3's default) both are the
same function, so the recorded log-probs are the sampling policy's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

import star_kernels as sk
from star_kernels.grpo import kl_penalty

from ..chat.qwen3 import END_OF_TURN
from ..data.examples import pack_batch, pad_batch
from ..data.prompts import load_prompts, prompts_fingerprint
from ..data.records import load_records
from ..reward import group_advantages, keep_group
from ..runtime import distributed
from ..runtime.config import ModelSpec, TrainConfig, enforce, section, setting
from ..runtime.generation import derived_seed
from ..runtime.models import (
    check_shared_vocabulary,
    check_vocab,
    load_model,
    load_tokenizer,
    model_renderer,
    predicting_rows,
)
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
    prompts_per_rollout: int = setting(128, min=1)  # kept groups per rollout (released: 128)
    max_sampling_rounds: int = setting(64, min=1)  # safety valve on refills (logged when hit)
    max_new_tokens: int = setting(512, min=1)
    temperature: float = setting(1.0, above=0)
    generate_batch_prompts: int = setting(8, min=1)  # prompts per generate() (x num_samples)


@dataclass
class GRPOConfig:
    clip_eps: float = setting(0.2, min=0)
    kl_coef: float = setting(1e-3, min=0)
    kl_estimator: str = setting("k2", choices=("k1", "k2", "k3"))
    # On-policy KD (released --op_kl_coef, 0.0 in both released scripts): this x the token
    # mean of KL(student || teacher) on the sampled tokens; > 0 needs teacher.model. The
    # released trainer has no flag of its own for the estimator: it reuses --kl_estimator
    # (k2 in the released scripts), and clamps it to [-10, 10] like the GRPO KL.
    op_kl_coef: float = setting(0.0, min=0)
    op_kl_estimator: str = setting("k2", choices=("k1", "k2", "k3"))


@dataclass
class TeacherConfig:
    model: ModelSpec = section(ModelSpec)  # only read when grpo.op_kl_coef > 0


@dataclass
class SimRLTrainConfig(TrainConfig):
    out_dir: str = setting("runs/simrl", path=True)
    lr: float = setting(3e-7, above=0)
    micro_batch_size: int = setting(8, min=1)
    save_every: int = setting(20, min=1)
    episodes: int = setting(3, min=1)     # passes over the prompts; max_steps stops earlier
    samples_per_step: int = setting(128, min=0)  # completions per optimizer step (0 = rollout)
    max_epochs: int = setting(1, min=1)   # passes over each rollout
    packing: bool = False  # each micro-batch as one padding-free row (positions restart)


@dataclass
class SimRLRunConfig:
    data: SimRLDataConfig = section(SimRLDataConfig)
    policy: PolicyConfig = section(PolicyConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    teacher: TeacherConfig = section(TeacherConfig)
    train: SimRLTrainConfig = section(SimRLTrainConfig)

    def validate(self) -> "SimRLRunConfig":
        teacher = self.teacher.model
        enforce(self, [(self.data.path, "data.path must name a STAR jsonl file"),
                       (not self.grpo.op_kl_coef or teacher.path or teacher.config,
                        "grpo.op_kl_coef > 0 needs teacher.model (a path or a config)"),
                       *self.train.checks()], {"policy": self.policy.model})
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
    teacher_logprobs: list[torch.Tensor] | None = None  # with on-policy KD only


def sampling_seed(seed: int, step: int, sampling_round: int, chunk: int) -> int:
    """The seed of one generate() call: a resumed step re-samples identically."""
    return derived_seed("simrl", seed, step, sampling_round, chunk)


def sample_round(policy, tokenizer, prompts, indices: list[int], cfg, step: int,
                 sampling_round: int, autocast) -> list[PromptGroup]:
    """Sample, decode and score one group per index in ``indices``; set ``kept``. Under
    torchrun the generate() chunks are split over the ranks and gathered back in order
    (``sample_and_score``): every rank returns every group."""
    r = cfg.rollout
    scored = sample_and_score(
        policy, tokenizer, [prompts[i] for i in indices], num_samples=r.num_samples,
        chunk_prompts=r.generate_batch_prompts,
        seed_of=lambda chunk: sampling_seed(cfg.train.seed, step, sampling_round, chunk),
        temperature=r.temperature, max_new_tokens=r.max_new_tokens, autocast=autocast,
        world=distributed.current())
    return [PromptGroup(s.prompt.index, s.prompt.ids, s.completions, s.texts, s.rewards,
                        keep_group(s.rewards), sampling_round) for s in scored]


def collect_groups(policy, tokenizer, prompts, stream: PromptStream, position: int, cfg,
                   step: int, autocast) -> tuple[list[PromptGroup], int, int]:
    """Dynamic filtering: sample rounds until ``prompts_per_rollout`` groups are kept, the
    round limit is hit or the stream ends. Returns (every sampled group, the new stream
    position, the number of rounds)."""
    wanted = cfg.rollout.prompts_per_rollout
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
class _Sample:
    """One kept completion of a rollout, with what its updates need."""

    prompt_ids: torch.Tensor
    completion: torch.Tensor
    advantage: float
    owner: PromptGroup
    old_logprobs: torch.Tensor | None = None  # float32 [L], recorded at sampling time
    ref_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None  # on-policy KD's target, recorded likewise


class SimRLStage:
    """A rollout = sample until ``rollout.prompts_per_rollout`` groups pass the filter;
    it then feeds optimizer steps of ``train.samples_per_step`` completions each (PPO
    mini-batches, reshuffled for each of ``train.max_epochs`` passes), whose ratio uses
    the log-probs recorded at sampling time. ``samples_per_step = 0``: the whole rollout
    in one step (on-policy: the op's own detached log-probs are the behaviour ones)."""

    name = "simrl"
    total_steps = None  # until the prompt stream cannot fill another rollout

    def __init__(self, cfg: SimRLRunConfig, trainer: Trainer, prompts, skipped: int,
                 end_token: str = END_OF_TURN):
        self.cfg, self.trainer, self.prompts = cfg, trainer, prompts
        self.end_token = end_token  # the chat format's end of turn: a finished completion's
        self.tokenizer = trainer.tokenizer
        self.stream = PromptStream(len(prompts), cfg.train.episodes, cfg.train.seed)
        self.position, self.rollouts = 0, 0
        self.samples: list[_Sample] = []
        self.pending: list[list[int]] = []  # the current rollout's mini-batches still to train
        r, t = cfg.rollout, cfg.train
        per_rollout = r.prompts_per_rollout * r.num_samples
        steps_per_rollout = (-(-per_rollout // t.samples_per_step) if t.samples_per_step
                             else 1) * t.max_epochs
        # every rollout consumes at least prompts_per_rollout positions of the stream
        self.planned_steps = max(1, len(self.stream) // r.prompts_per_rollout * steps_per_rollout)
        self.run_key = {"prompts_fingerprint": prompts_fingerprint(prompts),
                        "episodes": t.episodes, "seed": t.seed}
        # The KL anchor is the initial policy, also after a resume (the checkpoint only
        # overwrites the policy). Held in the compute dtype: it only ever runs under
        # autocast, whose matmuls see bf16 weights either way; fp32 would double its memory.
        self.reference = copy.deepcopy(trainer.model).to(trainer.compute_dtype)
        self.reference.eval().requires_grad_(False)
        self.teacher = load_teacher(cfg.teacher.model, trainer) if cfg.grpo.op_kl_coef else None

    @property
    def recorded_old(self) -> bool:
        """Whether updates need log-probs recorded at sampling time (the policy moves
        between the rollout and a later mini-batch or epoch)."""
        return bool(self.cfg.train.samples_per_step) or self.cfg.train.max_epochs > 1

    def at_boundary(self) -> bool:
        """Checkpoints are taken between rollouts: a resume re-samples the next rollout
        from the saved policy, exactly as the uninterrupted run did."""
        return not self.pending

    def plan_step(self, step: int) -> StepPlan | None:
        record, detail = {"rollout": self.rollouts - 1}, None  # the current rollout's index
        if not self.pending:
            if self.position + self.cfg.rollout.prompts_per_rollout > len(self.stream):
                return None  # a rollout starts only while a full first round is left
            record, detail = self._rollout(step), None
            detail = record.pop("_groups")
        batch = self.pending.pop(0)
        micro = self.cfg.train.micro_batch_size
        micro_batches = [batch[i:i + micro] for i in range(0, len(batch), micro)]
        tokens = [sum(len(self.samples[j].completion) for j in mb) for mb in micro_batches]
        return StepPlan(micro_batches, sum(tokens),
                        {**record, "completion_tokens": sum(tokens), "samples": batch},
                        detail=detail, micro_tokens=tokens)

    def _rollout(self, step: int) -> dict:
        """Sample the next rollout (dynamic filtering), record its old and reference
        log-probs, and lay out its mini-batches; returns the sampling fields for the log."""
        cfg = self.cfg
        groups, position, rounds = collect_groups(
            self.trainer.model, self.tokenizer, self.prompts, self.stream, self.position,
            cfg, step, self.trainer.autocast())
        if rounds == cfg.rollout.max_sampling_rounds and \
                sum(g.kept for g in groups) < cfg.rollout.prompts_per_rollout:
            self.trainer.log(f"rollout {self.rollouts}: rollout.max_sampling_rounds "
                             f"({rounds}) reached with fewer groups kept than wanted")
        consumed, self.position = position - self.position, position
        kept = [g for g in groups if g.kept]
        self.samples = []
        for group in kept:
            group.advantages = group_advantages(group.rewards, cfg.rollout.num_samples)
            group.old_logprobs, group.ref_logprobs = [], []
            if self.teacher is not None:
                group.teacher_logprobs = []
            self.samples += [_Sample(group.prompt_ids, c, a, group)
                             for c, a in zip(group.completions, group.advantages)]
        self._record_logprobs()
        self.pending = self._mini_batches()
        self.rollouts += 1
        tokens = sum(len(s.completion) for s in self.samples)
        record = _sampling_record(groups, kept, position, consumed, rounds, tokens,
                                  self.end_token)
        if self.teacher is not None:
            record["op_kl"] = None  # a step without an update has none
        return {**record, "rollout": self.rollouts - 1, "_groups": groups}

    @torch.no_grad()
    def _record_logprobs(self) -> None:
        """Reference log-probs of every kept completion, the teacher's (on-policy KD) and
        (when updates need them) the sampling policy's: all before any update of this
        rollout. Computed in micro-batches of ``train.micro_batch_size`` completions; under
        torchrun each rank computes every ``world_size``-th micro-batch and one
        ``all_gather`` hands every rank all of them (each micro-batch is the one a single
        process computes, so the values are too)."""
        models = [("ref_logprobs", self.reference)]
        if self.teacher is not None:
            models.append(("teacher_logprobs", self.teacher))
        if self.recorded_old:
            models.append(("old_logprobs", self.trainer.model))
        micro = self.cfg.train.micro_batch_size
        parts = [self.samples[first:first + micro]
                 for first in range(0, len(self.samples), micro)]

        def record(index: int) -> dict:
            part = parts[index]
            batch = self._batch(part)
            out = {}
            for field_name, model in models:
                with self.trainer.autocast():
                    rows, ids, weight, bias = predicting_rows(model, batch,
                                                              self.trainer.device)
                    logps = sk.fused_linear_logprobs(rows, weight, ids, bias=bias,
                                                     temperature=self.cfg.rollout.temperature)
                out[field_name] = logps.float().cpu().split([len(s.completion) for s in part])
            return out

        indices = list(range(len(parts)))
        for index, recorded in distributed.in_rounds(self.trainer.world, indices, record):
            part = parts[index]
            for field_name, _ in models:
                for sample, lp in zip(part, recorded[field_name]):
                    setattr(sample, field_name, lp)
                    getattr(sample.owner, field_name).append(lp)

    def _mini_batches(self) -> list[list[int]]:
        """Sample indices per optimizer step: ``max_epochs`` passes, each a seeded
        shuffle (OpenRLHF shuffles its replay buffer) cut into ``samples_per_step``."""
        t, n = self.cfg.train, len(self.samples)
        if not n:
            return [[]]  # nothing kept: one step without an update
        if not t.samples_per_step:
            return [list(range(n)) for _ in range(t.max_epochs)]
        out = []
        for epoch in range(t.max_epochs):
            gen = torch.Generator().manual_seed(derived_seed("simrl-minibatch", t.seed,
                                                             self.rollouts, epoch))
            order = torch.randperm(n, generator=gen).tolist()
            out += [order[i:i + t.samples_per_step] for i in range(0, n, t.samples_per_step)]
        return out

    def _batch(self, samples: list[_Sample]) -> dict:
        """The samples' prompt + completion sequences, the completion tokens as targets:
        right-padded, or with ``train.packing`` in one padding-free row (positions restart
        per sequence, no attention mask; the same target rows in the same order)."""
        sequences = [(torch.cat([s.prompt_ids, s.completion]),
                      torch.arange(len(s.prompt_ids) + len(s.completion)) >= len(s.prompt_ids))
                     for s in samples]
        if self.cfg.train.packing:
            return pack_batch(sequences)
        return pad_batch(sequences, self.tokenizer.pad_token_id)

    def micro_loss(self, policy, indices: list[int]):
        g, device = self.cfg.grpo, self.trainer.device
        part = [self.samples[i] for i in indices]
        lengths = [len(s.completion) for s in part]
        hidden, ids, weight, bias = predicting_rows(policy, self._batch(part), device)
        advantages = torch.tensor([s.advantage for s in part], dtype=torch.float32,
                                  device=device).repeat_interleave(
                                      torch.tensor(lengths, device=device))
        ref = torch.cat([s.ref_logprobs for s in part]).to(device)
        # Without recorded old log-probs the update is on-policy: old_logprobs=None (ratio
        # exp(logp - logp.detach())) gives the same loss and gradient as passing them.
        old = torch.cat([s.old_logprobs for s in part]).to(device) if self.recorded_old else None
        loss, stats = sk.fused_linear_grpo_loss(
            hidden, weight, ids, advantages, torch.ones_like(ids, dtype=torch.bool),
            old_logprobs=old, ref_logprobs=ref, clip_eps=g.clip_eps, kl_coef=g.kl_coef,
            kl_estimator=g.kl_estimator, temperature=self.cfg.rollout.temperature, bias=bias,
            loss_agg="token_mean")
        if not self.recorded_old:  # the op's own log-probs are the behaviour ones
            for sample, lp in zip(part, stats["logprobs"].float().cpu().split(lengths)):
                sample.owner.old_logprobs.append(lp)
        n = sum(lengths)  # the skeleton wants sums over the micro-batch's tokens
        sums = {"kl": stats["mean_kl"].item() * n,
                "clip_fraction": stats["clip_fraction"].item() * n}
        if self.teacher is not None:
            op_kl = self._op_kl(part, hidden, weight, ids, bias)
            loss = loss + g.op_kl_coef * op_kl
            sums["op_kl"] = op_kl.item() * n
        return loss * n, sums

    def _op_kl(self, part: list[_Sample], hidden, weight, ids, bias) -> torch.Tensor:
        """Token mean of the estimate of KL(student || teacher) on the micro-batch's
        sampled tokens (the released ``op_kl``: log pi_student - log pi_teacher in the
        estimator, teacher detached, the per-token value clamped to [-10, 10]).

        The GRPO op hands back its log-probs detached, so the student's differentiable
        ones come from a second fused pass over the same trunk rows (the trunk runs once:
        both terms are summed before the one backward). It saves only its inputs and
        recomputes each chunk's logits in backward, so the cost is one more logits GEMM
        forward and three in backward, on the completion tokens only; no ``[tokens x
        vocab]`` tensor exists at any point."""
        g = self.cfg.grpo
        logp = sk.fused_linear_logprobs(hidden, weight, ids, bias=bias,
                                        temperature=self.cfg.rollout.temperature)
        target = torch.cat([s.teacher_logprobs for s in part]).to(logp.device)
        return kl_penalty(logp, target, g.op_kl_estimator, kl_clamp=10.0).mean()

    def state(self) -> dict:
        return {"stream_position": self.position, "rollouts": self.rollouts}

    def restore(self, state: dict) -> None:
        self.position, self.rollouts = state["stream_position"], state.get("rollouts", 0)

    def describe(self, record: dict) -> str:
        line = f"rollout {record['rollout']}"
        if "reward_mean" in record:  # the rollout's first step: what sampling did
            line += (f"  reward {record['reward_mean']:.3f}  kept {record['groups_kept']}/"
                     f"{record['groups_sampled']}  prompts {record['prompts_consumed']}")
        if record["updated"]:
            op_kl = f"  op_kl {record['op_kl']:.2e}" if record.get("op_kl") is not None else ""
            return line + (f"  loss {record['loss']:.4f}  kl {record['kl']:.2e}{op_kl}  clip "
                           f"{record['clip_fraction']:.3f}  tokens {record['completion_tokens']}")
        return line + "  no group kept: no update"


def load_teacher(spec: ModelSpec, trainer: Trainer):
    """The on-policy KD teacher: frozen, in eval mode and in the run's compute dtype (it
    only runs under autocast, whose matmuls see that dtype either way), refused unless
    its token ids mean what the policy's do (the KL compares the same sampled ids)."""
    teacher = load_model(spec, trainer.compute_dtype, trainer.device)
    teacher.eval().requires_grad_(False)
    check_vocab(teacher, trainer.tokenizer, "teacher")
    own = _own_tokenizer(spec)
    # the same object (a config-built teacher's offline Qwen3 tokenizer is the run's):
    # nothing to compare, and comparing two 151k-token tables takes a second
    check_shared_vocabulary(teacher, trainer.model, None if own is trainer.tokenizer else own,
                            trainer.tokenizer)
    return teacher


def _own_tokenizer(spec: ModelSpec):
    """The teacher's own tokenizer when it has one (a folder with tokenizer files, a
    ``.gguf`` file, or a config-built Qwen3's); None for a bare weights folder, which
    can then only be checked by its vocabulary size."""
    folder = Path(spec.path) if spec.path else None
    if folder is not None and folder.is_dir() and not any(
            (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(spec)


def _sampling_record(groups, kept, position, consumed, rounds, tokens, end_token) -> dict:
    rewards = [r for g in groups for r in g.rewards]
    kept_rewards = [r for g in kept for r in g.rewards]
    eos_free = sum(1 for g in groups for t in g.texts if not t.endswith(end_token))
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
    log = distributed.main_only_log(log, distributed.current())
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.policy.model)
    renderer = model_renderer(cfg.policy.model, tokenizer, "policy.model")
    out = open_run(cfg.train.out_dir, cfg)
    prompts, skipped = load_prompts(load_records(cfg.data.path, cfg.data.limit),
                                    cfg.data.max_prompt_length, tokenizer, renderer)
    log(f"{len(prompts)} prompts; skipped {skipped} longer than "
        f"{cfg.data.max_prompt_length} tokens")
    per_step = cfg.rollout.prompts_per_rollout
    if len(prompts) * cfg.train.episodes < per_step:
        raise ValueError(f"rollout.prompts_per_rollout {per_step} exceeds the "
                         f"{len(prompts)} usable prompts x {cfg.train.episodes} episodes")
    trainer = Trainer(cfg.train, cfg.policy.model, out, tokenizer=tokenizer,
                      gradient_checkpointing=cfg.policy.gradient_checkpointing,
                      role="policy", log=log)
    stage = SimRLStage(cfg, trainer, prompts, skipped, renderer.end_token)
    summary = trainer.fit(stage, on_step_end)
    return {**summary, "stream_position": stage.position, "skipped_prompts": skipped,
            "num_prompts": len(prompts)}
