"""Fused CKD distillation on TRL's SFT data path (``pip install "star-kernels[trl]"``).

:class:`CKDSFTTrainer` is TRL's ``SFTTrainer`` (its dataset preparation: text,
prompt-completion or conversational data, chat templates, ``completion_only_loss``,
``assistant_only_loss``, truncation) with the loss replaced by the fused CKD loss. The
teacher's top-k comes from either

* a cache: ``teacher_ids`` / ``teacher_logprobs`` columns of a pre-tokenized dataset,
  one ``[len(input_ids) - 1, K]`` list per row (entry ``t`` predicts ``input_ids[t + 1]``,
  as :func:`star_kernels.hf.teacher_topk_from_model` returns them), kept through
  TRL's column removal and padded by :class:`TeacherColumnsCollator`; or
* a teacher model on the fly (``teacher_model=``): its top-k for every counted token
  of each batch, computed without gradients under the same mixed precision.

TRL's own collator drops columns it does not know, which is why ``CKDTrainerMixin``
mixed into ``SFTTrainer`` fails with ``KeyError: 'teacher_ids'``.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import trl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('star_kernels.trl needs TRL: pip install "star-kernels[trl]"') from err

from .hf import CKDTrainerMixin, grpo_loss_from_model, teacher_topk_from_model, trainer_autocast

__all__ = ["TEACHER_COLUMNS", "CKDSFTTrainer", "FusedGRPOMixin", "TeacherColumnsCollator"]

TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


class TeacherColumnsCollator:
    """Wrap a collator: the rest of each example goes to ``base``; the teacher columns are
    checked against each row's ``input_ids`` and padded to ``[B, T - 1, K]`` (id 0,
    log-prob ``-inf``), ``T`` being the padded length of the batch ``base`` returns.

    TRL truncates ``input_ids`` and ``labels`` to ``max_length`` but not other columns:
    the teacher entries are cut the same way here (``truncation_mode`` ``"keep_start"``
    keeps the first ``len(input_ids) - 1`` predictions, ``"keep_end"`` the last).
    """

    def __init__(self, base, truncation_mode: str = "keep_start"):
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', "
                             f"got {truncation_mode!r}")
        self.base = base
        self.truncation_mode = truncation_mode

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        has = [all(c in ex for c in TEACHER_COLUMNS) for ex in examples]
        batch = self.base([{k: v for k, v in ex.items() if k not in TEACHER_COLUMNS}
                           for ex in examples])
        if not any(has):
            return batch
        if not all(has):
            raise ValueError("some examples of the batch have teacher columns and others not")
        if batch["input_ids"].dim() != 2 or batch["input_ids"].shape[0] != len(examples):
            raise ValueError("teacher columns need one padded row per example (no packing or "
                             "padding-free batches)")
        rows = [self._row(i, ex) for i, ex in enumerate(examples)]
        k = max(ids.shape[1] for ids, _ in rows)
        n = batch["input_ids"].shape[1] - 1
        out_ids = torch.zeros(len(rows), n, k, dtype=torch.long)
        out_logps = torch.full((len(rows), n, k), float("-inf"))
        for i, (ids, logps) in enumerate(rows):
            out_ids[i, :ids.shape[0], :ids.shape[1]] = ids
            out_logps[i, :logps.shape[0], :logps.shape[1]] = logps
        batch["teacher_ids"], batch["teacher_logprobs"] = out_ids, out_logps
        return batch

    def _row(self, i, example):
        ids = torch.as_tensor(example["teacher_ids"], dtype=torch.long)
        logps = torch.as_tensor(example["teacher_logprobs"], dtype=torch.float32)
        want = len(example["input_ids"]) - 1
        if ids.dim() != 2 or ids.shape != logps.shape:
            raise ValueError(f"example {i}: teacher_ids and teacher_logprobs must both be "
                             f"[len(input_ids) - 1, K] lists, got {tuple(ids.shape)} and "
                             f"{tuple(logps.shape)}")
        if ids.shape[0] < want:
            raise ValueError(
                f"example {i}: {ids.shape[0]} teacher entries for {want + 1} input_ids; the cache "
                f"needs one entry per prediction, len(input_ids) - 1 = {want} (entry t predicts "
                "input_ids[t + 1]; see star_kernels.hf)")
        if ids.shape[0] > want:            # TRL truncated input_ids to max_length
            cut = slice(0, want) if self.truncation_mode == "keep_start" else slice(-want, None)
            ids, logps = ids[cut], logps[cut]
        return ids, logps


class CKDSFTTrainer(CKDTrainerMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` with the fused CKD loss.

    ``CKDSFTTrainer(model=student, args=SFTConfig(...), train_dataset=ds,
    processing_class=tok, ckd_kwargs={"tail_coef": 10.0, "student_topm": 100},
    teacher_model=None or teacher, teacher_k=100)``

    Counted tokens are TRL's (``labels != -100``: completion-only or assistant-only
    loss, padding excluded). Packing and padding-free batches are refused: the teacher
    entries are per row.
    """

    def __init__(self, *args, teacher_model=None, teacher_k: int = 100,
                 ckd_kwargs: dict | None = None, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None and (config.packing or config.padding_free):
            raise ValueError("CKDSFTTrainer does not support packing or padding_free: the "
                             "teacher's top-k is per row (set packing=False, "
                             "padding_free=False)")
        super().__init__(*args, **kwargs)
        if ckd_kwargs is not None:
            self.ckd_kwargs = dict(ckd_kwargs)
        self.data_collator = TeacherColumnsCollator(self.data_collator,
                                                    self.args.truncation_mode)
        self.teacher_k = teacher_k
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(self.accelerator.device)

    def _set_signature_columns_if_needed(self):
        # TRL keeps only the model's inputs when remove_unused_columns is on: keep the cache.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in TEACHER_COLUMNS if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "teacher_ids" not in inputs and self.teacher_model is not None:
            labels = inputs.get("labels")
            with trainer_autocast(self):
                ids, logps = teacher_topk_from_model(
                    self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"),
                    self.teacher_k, loss_mask=None if labels is None else labels != -100,
                    backend=self.ckd_kwargs.get("backend", "auto"))
            inputs = {**inputs, "teacher_ids": ids, "teacher_logprobs": logps}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # SFTTrainer's version reads logits from the outputs; the fused loss has none.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# GRPO: TRL's GRPOTrainer with its loss computed by the fused GRPO op.
_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo")


def _check_grpo_settings(trainer):
    args = trainer.args
    unsupported = {
        "loss_type": (trainer.loss_type not in _GRPO_LOSS_TYPES, trainer.loss_type),
        "importance_sampling_level": (args.importance_sampling_level != "token",
                                      args.importance_sampling_level),
        "delta": (args.delta is not None, args.delta),
        "top_entropy_quantile": (trainer.top_entropy_quantile < 1.0,
                                 trainer.top_entropy_quantile),
        "off_policy_mask_threshold": (trainer.off_policy_mask_threshold is not None,
                                      trainer.off_policy_mask_threshold),
        "use_bias_correction_kl": (trainer.beta != 0.0 and args.use_bias_correction_kl, True),
        "vllm_importance_sampling_correction": (
            trainer.use_vllm and args.vllm_importance_sampling_correction, True),
    }
    bad = [f"{name}={value!r}" for name, (is_bad, value) in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"FusedGRPOMixin computes TRL's loss_type in {list(_GRPO_LOSS_TYPES)} "
                         f"with token-level PPO clipping and the k3 KL; unsupported: "
                         f"{', '.join(bad)} (use TRL's own loss for those)")


class FusedGRPOMixin:
    """Mix into ``trl.GRPOTrainer``: the policy loss comes from
    :func:`star_kernels.fused_linear_grpo_loss` (no ``[tokens, vocab]`` logits) instead
    of TRL's per-token log-probs followed by its loss in PyTorch.

    ``class Trainer(FusedGRPOMixin, trl.GRPOTrainer): pass``. Same objective as TRL's
    for ``loss_type`` ``"dapo"`` (TRL's default), ``"bnpo"`` and ``"grpo"``: clip
    ``(epsilon, epsilon_high)``, k3 KL times ``beta`` to the reference log-probs TRL
    computed, ``temperature``; other settings are refused with their names. TRL's
    loss metrics other than the clip fraction and KL are not logged.
    """

    def _compute_loss(self, model, inputs):
        _check_grpo_settings(self)
        prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        # TRL's per-completion-token tensors -> star_kernels.hf's layout: completion token j
        # sits at input position P + j, predicted by prediction P + j - 1.
        p = prompt_mask.shape[1]
        full_mask = torch.cat([torch.zeros_like(prompt_mask), mask], 1)

        def per_prediction(t):
            if t is None:
                return None
            out = t.new_zeros(input_ids.shape[0], input_ids.shape[1] - 1)
            out[:, p - 1:] = t
            return out

        loss_agg = "seq_mean" if self.loss_type == "grpo" else "token_mean"
        loss, diag = grpo_loss_from_model(
            model, input_ids, attention_mask, full_mask, inputs["advantages"],
            old_logprobs=per_prediction(inputs.get("old_per_token_logps")),
            ref_logprobs=per_prediction(inputs.get("ref_per_token_logps"))
            if self.beta != 0.0 else None,
            clip_eps=(self.epsilon_low, self.epsilon_high), kl_coef=self.beta,
            kl_estimator="k3", temperature=self.temperature, loss_agg=loss_agg)
        counted = mask.sum()
        mode = "train" if self.model.training else "eval"
        if self.loss_type == "grpo":
            # TRL averages over every sequence, ours over those with a counted token.
            loss = loss * (mask.sum(-1) > 0).sum() / mask.shape[0]
        if self.loss_type == "dapo":
            # TRL's: num_items_in_batch spans the generation batch; rescale to one window.
            normalizer = (inputs["num_items_in_batch"].clamp(min=1.0)
                          / self.accelerator.num_processes)
            if mode == "train":
                normalizer = (normalizer * self.current_gradient_accumulation_steps
                              / self.args.steps_per_generation)
            loss = loss * counted / normalizer
        elif mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        self._metrics[mode]["clip_ratio/region_mean"].append(
            self.accelerator.gather(diag["clip_fraction"].detach()).nanmean().item())
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(
                self.accelerator.gather(diag["mean_kl"].detach()).nanmean().item())
        return loss
