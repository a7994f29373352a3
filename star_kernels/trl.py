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

from .hf import CKDTrainerMixin, teacher_topk_from_model, trainer_autocast

__all__ = ["TEACHER_COLUMNS", "CKDSFTTrainer", "TeacherColumnsCollator"]

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
