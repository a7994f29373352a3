"""The training skeleton that every training stage runs in.

A stage (CKD, Sim-RL) supplies only what is its own: which work each optimizer step
does (``plan_step``) and the loss of one micro-batch (``micro_loss``). The skeleton owns
the rest, the same for every stage:

* the model: loaded in fp32 (AdamW updates at lr 3e-6 vanish in bf16), vocabulary
  checked against the tokenizer, its attention implementation and optional Liger trunk
  kernels (``speedups``), gradient checkpointing, train mode;
* AdamW and the learning-rate schedule (as released: betas (0.9, 0.95), no decay on
  biases and norm weights, 3% linear warm-up, cosine down to 0.1 x lr);
* resume: the newest checkpoint under ``checkpoints/`` restores the model, optimizer,
  scheduler, RNG and the stage's own state (``Stage.state``), after checking that it was
  written under the same data settings (``Stage.run_key``); log lines of steps after it
  are dropped, since their updates died with the interrupted run;
* each step: autocast to ``train.dtype``, the micro-batches' losses accumulated so that
  the gradient is that of the step's loss however the step is split (each micro-batch
  returns a *sum* over its tokens, the skeleton divides by the step's token count),
  gradient clipping, the optimizer and scheduler steps;
* ``train_log.jsonl`` (one line per step, with tokens/s), a progress line every
  ``train.log_every`` steps with throughput and ETA, and with ``train.tensorboard`` the
  same numbers as TensorBoard scalars under ``tensorboard/``;
* checkpoints every ``train.save_every`` steps and at the end (atomic, see
  ``checkpoint``), and the trained model with the tokenizer in ``final/``;
* under ``torchrun``, data parallelism (``runtime.distributed``): each rank takes every
  ``world_size``-th micro-batch of the step's plan, the gradients are summed over the
  ranks once per step, rank 0 writes the log, checkpoints and ``final/``. Checkpoints
  hold the same full state whatever the world size, so a run resumes on any number of
  processes. With ``train.data_parallel = "fsdp2"`` the student is sharded with FSDP2
  after gradient checkpointing is enabled (``distributed.shard_model``); every rank then
  runs the same number of micro-batches (the short ones repeat one at loss scale 0, since
  FSDP2's collectives run in every forward/backward), the scales are multiplied by the
  world size (FSDP2 averages the gradients over the ranks), the gradients are clipped by
  their global norm, and checkpoints and ``final/`` are gathered into the unsharded format
  for rank 0 to write, so a run resumes on any world size in either mode.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from . import distributed, speedups
from .checkpoint import append_log, latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from .config import ModelSpec, TrainConfig
from .models import DTYPES, autocast, check_vocab, enable_gradient_checkpointing, load_model


@dataclass
class StepPlan:
    """What one optimizer step of a stage consists of."""

    micro_batches: list          # handed to ``Stage.micro_loss`` one by one; empty: no update
    num_tokens: int              # the step's loss = sum of the micro-batch losses / this
    record: dict = field(default_factory=dict)  # the stage's own fields for train_log.jsonl
    detail: Any = None           # handed to ``on_step_end`` (e.g. Sim-RL's sampled groups)
    micro_tokens: list | None = None  # tokens per micro-batch (train.loss_normalization)


@dataclass
class StepReport:
    """What ``on_step_end(step, report)`` receives after each step (and its checkpoint)."""

    step: int
    record: dict                 # the line written to train_log.jsonl
    detail: Any = None


class Stage(Protocol):
    name: str                    # prefix of progress lines
    run_key: dict                # data settings a checkpoint must have been written under
    total_steps: int | None      # None: until plan_step returns None
    planned_steps: int           # with total_steps None: the expected count, for the lr schedule

    def plan_step(self, step: int) -> StepPlan | None: ...

    def micro_loss(self, model, micro_batch) -> tuple[torch.Tensor, dict]:
        """``(loss summed over the micro-batch's tokens, {stat: token-weighted sum})``."""

    def state(self) -> dict: ...              # the stage's own resumable state

    def restore(self, state: dict) -> None: ...

    def describe(self, record: dict) -> str: ...  # the stage's part of a progress line

    # optional: ``at_boundary() -> bool``, False where a checkpoint could not resume exactly
    # (Sim-RL inside a rollout); a due checkpoint then waits for the next boundary.


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``train.lr``.

    ``"cosine"`` is the released runs' schedule (OpenRLHF's ``cosine_with_min_lr``, from
    transformers): linear from 0 over ``warmup`` steps, then half a cosine from 1 down to
    ``min_ratio`` at ``total``. ``"constant"``: linear warm-up to 1, then 1.
    """
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_and_scheduler(model, train: TrainConfig, total_steps: int) -> tuple:
    """AdamW over the fp32 parameters and the ``train.lr_schedule`` over ``total_steps``.

    As released (OpenRLHF's defaults): betas ``train.adam_betas`` (0.9, 0.95) and no weight
    decay on biases and normalisation weights. OpenRLHF picks those by name ("bias",
    "norm.weight", ...); for the decoder families trained here that is exactly the set of
    1-D parameters, which is what is tested here, whatever a module is called.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr,
                                  betas=tuple(train.adam_betas))
    warmup = math.ceil(total_steps * train.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, schedule=train.lr_schedule, warmup=warmup, total=total_steps,
        min_ratio=train.min_lr_ratio))
    return optimizer, scheduler


class Trainer:
    """Loads the model to train and runs a :class:`Stage` on it (see the module doc)."""

    def __init__(self, train: TrainConfig, model_spec: ModelSpec, out: Path, *, tokenizer,
                 gradient_checkpointing: bool, role: str = "student", log=print):
        self.world = distributed.current()
        self.train, self.out, self.tokenizer = train, Path(out), tokenizer
        self.log = distributed.main_only_log(log, self.world)
        self.device = self.world.device(train.device)
        self.compute_dtype = DTYPES[train.dtype]
        attention = speedups.pick_attention(train.attn_implementation, self.device)
        self.model = load_model(model_spec, torch.float32, self.device)
        check_vocab(self.model, tokenizer, role)
        self.world.broadcast_parameters(self.model)
        speedups.set_attention(self.model, attention)
        if train.liger_kernels:
            speedups.apply_liger_trunk(self.model, self.device, self.log)
        self.model.train()
        if gradient_checkpointing:  # before sharding: fully_shard wraps the layers' forwards
            enable_gradient_checkpointing(self.model)
        # FSDP2: the optimizer (built in fit) then holds the shards, whose ndim is the full
        # parameter's (a DTensor reports the global shape), so the no-decay rule is unchanged.
        self.sharded = train.data_parallel == "fsdp2" and self.world.enabled
        if self.sharded and role != "student":
            # Sim-RL samples its rollouts from this model, a different number of forwards
            # on each rank (their own prompts and lengths), while FSDP2's all-gathers need
            # every rank in every forward; it also deep-copies the model as its reference.
            raise ValueError(f"train.data_parallel = fsdp2 trains a CKD student only, not a "
                             f"{role} (use ddp)")
        if self.sharded:
            distributed.shard_model(self.model)
        elif train.data_parallel == "fsdp2":
            self.log("train.data_parallel = fsdp2 in a world of one process: training the "
                     "unsharded model")

    def autocast(self):
        """A fresh mixed-precision context for this run's device and compute dtype."""
        return autocast(self.device, self.compute_dtype)

    def fit(self, stage: Stage, on_step_end=None) -> dict:
        """Run (or resume) ``stage`` to its end or ``train.max_steps``; returns a summary."""
        train, model = self.train, self.model
        ckpt_root, log_path = self.out / "checkpoints", self.out / "train_log.jsonl"
        total = stage.total_steps if stage.total_steps is not None else math.inf
        if train.max_steps:
            total = min(total, train.max_steps)
        # The schedule needs a length; a stage that stops on its own (Sim-RL, at the end of
        # its prompt stream) says how many steps it plans.
        planned = total if total != math.inf else stage.planned_steps
        self.optimizer, self.scheduler = optimizer_and_scheduler(model, train, planned)
        step, updates = 0, 0
        if (ckpt := latest_checkpoint(ckpt_root)) is not None:
            state = load_checkpoint(ckpt, model, self.optimizer, self.scheduler,
                                    run=stage.run_key)
            step, updates = state["step"], state.get("updates", state["step"])
            stage.restore(state)
            self.log(f"resumed from {ckpt} at step {step}")
        start = step
        main = self.world.is_main
        if main:
            truncate_log(log_path, start)
        board = self._tensorboard(start) if main else None
        saved_at, record, began = start, {}, time.perf_counter()
        while step < total:
            t0 = time.perf_counter()
            plan = stage.plan_step(step)
            if plan is None:
                break
            record = self._step(stage, plan)
            updates += record["updated"]
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, **record, "lr": self.scheduler.get_last_lr()[0],
                      "seconds": round(seconds, 3),
                      "tokens_per_s": round(plan.num_tokens / seconds, 1) if seconds else None,
                      "world_size": self.world.world_size, **self._peak_memory()}
            if main:
                append_log(log_path, record)
            if board is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        board.add_scalar(f"{stage.name}/{key}", value, step)
            if step % train.log_every == 0 or step == total:
                self.log(self._progress(stage, record, step, total, start, began))
            if step - saved_at >= train.save_every and self._at_boundary(stage):
                self._save(ckpt_root, step, updates, stage)
                saved_at = step
            if on_step_end is not None:
                on_step_end(step, StepReport(step, record, plan.detail))
        if step != saved_at and self._at_boundary(stage):
            self._save(ckpt_root, step, updates, stage)
        if board is not None:
            board.close()
        summary = {"steps": step, "start_step": start, "updates": updates,
                   "final_loss": record.get("loss", math.nan) if record else math.nan,
                   "model_dir": None}
        if updates == 0:
            self.log("no step updated the model, so no final/ model was written")
            return summary
        final = self.out / "final"
        full = distributed.full_model_state(model, keep=main) if self.sharded else None
        if main:
            model.save_pretrained(final, **({} if full is None else {"state_dict": full}))
            self.tokenizer.save_pretrained(final)
        del full
        self.world.barrier()  # final/ is complete before any rank returns its path
        self.log(f"saved the trained model to {final}")
        return {**summary, "model_dir": str(final)}

    @staticmethod
    def _at_boundary(stage) -> bool:
        """Whether a checkpoint taken now resumes exactly (a stage without
        ``at_boundary`` always does)."""
        at_boundary = getattr(stage, "at_boundary", None)
        return at_boundary is None or at_boundary()

    def _tensorboard(self, start: int):
        if not self.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("train.tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from error
        # purge_step: a resumed run drops the events its interrupted predecessor logged
        # after the checkpoint, as truncate_log does for train_log.jsonl.
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=start)

    def _step(self, stage: Stage, plan: StepPlan) -> dict:
        """Accumulate this rank's share of the plan's micro-batches, sum the gradients over
        the ranks, clip, step; the step's log fields."""
        self.model.train()  # a stage may have sampled from it in eval mode
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro_batch, scale, weight in self._share(plan):
            with self.autocast():
                loss, stats = stage.micro_loss(self.model, micro_batch)
            (loss * scale).backward()
            for key, value in {"loss": loss.item(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * weight * plan.num_tokens
        record = {**plan.record, "tokens": plan.num_tokens, "updated": bool(plan.micro_batches)}
        if record["updated"]:
            if self.world.enabled:
                if not self.sharded:  # FSDP2 reduce-scattered them in each backward
                    self.world.sum_gradients(self.model.parameters())
                # Every rank must hold every stat key (a rank with no micro-batch has none).
                keys = sorted({"loss", *(k for p in self.world.all_gather(sorted(sums)) for k in p)})
                sums = dict(zip(keys, self.world.sum([sums.get(k, 0.0) for k in keys])))
            record.update({key: value / plan.num_tokens for key, value in sums.items()})
            record["grad_norm"] = self._clip_gradients()
            self.optimizer.step()
        else:
            record.setdefault("loss", None)
            record.setdefault("grad_norm", None)
        with warnings.catch_warnings():  # a step without an update still advances the lr
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return record

    def _share(self, plan: StepPlan) -> list[tuple]:
        """This rank's ``(micro_batch, gradient scale, stat weight)`` of the plan.

        The scales are the whole step's, so the ranks' gradients add up to one process's.
        With FSDP2 two things change. Its collectives (the all-gather of each unit in
        forward and backward, the reduce-scatter of its gradients, the gathered lm_head)
        run per forward/backward and need every rank to join: a rank with fewer
        micro-batches would leave the others waiting forever. So every rank runs
        ``ceil(count / world_size)`` of them, the short ones repeating one micro-batch (any
        of the plan's for a rank without one) with scale 0, which adds exactly nothing to
        the gradients and the stats. And FSDP2 averages the gradients over the ranks
        (reduce-scatter with avg, and the gathered head's ``Partial("avg")``): the scale is
        multiplied by ``world_size`` so that the average is the sum one process computes.
        The gradients are reduce-scattered after every micro-batch (FSDP2's default),
        rather than accumulated unsharded with ``set_requires_gradient_sync(False)``, so a
        rank never holds more than its shard of the gradients between micro-batches.
        """
        scales = self._loss_scales(plan)
        share = [(mb, s, s) for mb, s in self.world.share(list(zip(plan.micro_batches, scales)))]
        if not self.sharded or not plan.micro_batches:
            return share
        size = self.world.world_size
        count = -(-len(plan.micro_batches) // size)
        filler = share[0][0] if share else plan.micro_batches[0]
        return [(mb, s * size, w) for mb, s, w in share] + [(filler, 0.0, 0.0)] * (count - len(share))

    def _clip_gradients(self) -> float:
        """Clip the gradients to ``train.max_grad_norm``; their norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, self.train.max_grad_norm))
        # DTensor gradients: each rank's norm is of its shards (a Partial placement); the
        # full tensor is the norm of the whole gradient (a collective), which clips all.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        torch.nn.utils.clip_grads_with_norm_(params, self.train.max_grad_norm, norm)
        return float(norm)

    def _loss_scales(self, plan: StepPlan) -> list[float]:
        """What each micro-batch's token-summed loss is multiplied by. ``step_tokens``: the
        token mean over the whole step, however it is split. ``micro_batch`` (as released:
        OpenRLHF averages per-micro-batch token means over the accumulation steps): each
        micro-batch's own token mean, averaged."""
        count = len(plan.micro_batches)
        if not count:
            return []
        if self.train.loss_normalization == "step_tokens" or plan.micro_tokens is None:
            return [1.0 / plan.num_tokens] * count
        return [1.0 / (max(1, n) * count) for n in plan.micro_tokens]

    def _peak_memory(self) -> dict:
        """This step's peak device memory (CUDA only; the counter restarts every step)."""
        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"peak_memory_gib": round(peak / 2**30, 3)}

    def _progress(self, stage, record, step, total, start, began) -> str:
        line = f"{stage.name} step {step}/{total if total != math.inf else '?'}  "
        line += stage.describe(record)
        if record.get("tokens_per_s"):
            line += f"  {record['tokens_per_s']:,.0f} tok/s"
        if total != math.inf:
            remaining = (time.perf_counter() - began) / (step - start) * (total - step)
            line += f"  eta {_duration(remaining)}"
        return line

    def _save(self, root, step, updates, stage):
        # DDP: the ranks hold identical weights and optimizer states, rank 0's are the
        # run's. FSDP2: every rank joins in gathering the full states, rank 0 writes them.
        full = {}
        if self.sharded:
            keep = self.world.is_main
            full = {"model_state": distributed.full_model_state(self.model, keep),
                    "optimizer_state": distributed.full_optimizer_state(self.optimizer, keep)}
        if self.world.is_main:
            save_checkpoint(root, step, self.model, self.optimizer, self.scheduler,
                            {**stage.state(), "updates": updates, "run": stage.run_key},
                            keep=self.train.keep_checkpoints, **full)
        del full
        self.world.barrier()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
