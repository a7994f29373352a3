"""Fused linear CKD loss: hidden states + lm_head weight + teacher top-k -> loss.

No ``[tokens, vocab]`` logits are allocated: rows are processed in chunks whose
size follows ``memory_budget`` (see :mod:`star_kernels._chunked`).
"""

from __future__ import annotations

import functools

import torch

from . import _backends, _validation as V
from ._chunked import rows_per_chunk, run_chunks
from ._config import CKDConfig

REDUCTIONS = ("mean", "sum", "none")


class _FusedLinearCKD(torch.autograd.Function):
    """Rows are already the valid tokens only; returns the reduced loss or per-row losses."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_ids, teacher_logprobs, labels,
                cfg, backend, memory_budget, reduction):
        row_op, workspace = _backends.row_functions(backend, "ckd")
        row_op = functools.partial(row_op, cfg=cfg)
        n = hidden.shape[0]
        chunk = rows_per_chunk(n, weight.shape[0], workspace(hidden.dtype), memory_budget)
        rows = (teacher_ids, teacher_logprobs, labels)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        needs = ctx.needs_input_grad
        ctx.reduction = reduction
        ctx.bias_given = bias is not None
        with_grad = reduction != "none" and any(needs[:3])
        per_row = 1.0 / max(n, 1) if reduction == "mean" else 1.0
        scale = hidden.new_full((n,), per_row, dtype=out_dtype) if with_grad else None
        (losses,), gh, gw, gb = run_chunks(
            hidden, weight, bias, row_op, rows, scale, chunk,
            need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
        if reduction == "none":
            # Per-token upstream gradients are only known in backward: recompute there.
            ctx.row_op, ctx.chunk = row_op, chunk
            ctx.save_for_backward(hidden, weight, bias, *rows)
            return losses.to(out_dtype)
        ctx.save_for_backward(gh, gw, gb)
        return (losses.sum() * per_row).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, *rows = ctx.saved_tensors
            needs = ctx.needs_input_grad
            _, gh, gw, gb = run_chunks(
                hidden, weight, bias, ctx.row_op, rows, grad_out, ctx.chunk,
                need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
        else:
            gh, gw, gb = ctx.saved_tensors
            for g in (gh, gw, gb):
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        return gh, gw, gb if ctx.bias_given else None, *([None] * 7)


def _check_ckd_args(hidden, weight, teacher_ids, teacher_logprobs, mask, bias,
                    labels, cfg, reduction, memory_budget):
    V.check_linear(hidden, weight, bias)
    token_shape, vocab = hidden.shape[:-1], weight.shape[0]
    V.check_teacher(teacher_ids, teacher_logprobs, token_shape, vocab, hidden.device)
    if mask is not None:
        V.check_token_tensor("mask", mask, token_shape, hidden.device,
                             (torch.bool, torch.uint8, torch.int32, torch.int64))
    if not isinstance(cfg.student_topm, int) or not 1 <= cfg.student_topm <= vocab:
        raise ValueError(f"student_topm must be an int in [1, V={vocab}], "
                         f"got {cfg.student_topm!r}")
    if not 0.0 <= cfg.kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {cfg.kd_ratio!r}")
    if not (cfg.tail_coef >= 0.0 and cfg.tail_coef != float("inf")):
        raise ValueError(f"tail_coef must be a finite number >= 0, got {cfg.tail_coef!r}")
    V.check_positive("temperature", cfg.temperature)
    V.check_choice("reduction", reduction, REDUCTIONS)
    if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if cfg.kd_ratio < 1.0:
        if labels is None:
            raise ValueError("labels is required when kd_ratio < 1 (the CE part needs targets)")
        V.check_token_tensor("labels", labels, token_shape, hidden.device, V.INT_DTYPES)
        V.check_ids_in_vocab("labels", labels, vocab, allow=cfg.ignore_index)


def fused_linear_ckd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tail_coef: float = 10.0,
    student_topm: int = 100,
    kd_ratio: float = 1.0,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    tail_bucket: bool = False,
    ignore_index: int = -100,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """STAR's constrained knowledge-distillation loss, fused with the lm_head.

    Per valid token: ``sum_{j in S} p_j (log p_j - log q_j) + tail_coef * sum_{v in
    M \\ S} q_v`` where ``q = softmax((hidden @ weight.T + bias) / temperature)``,
    ``S`` are the teacher's ids (``-inf`` log-probs are padding) and ``M`` the
    student's ``student_topm`` most likely ids (ties at the threshold included).
    ``kd_ratio < 1`` mixes in next-token CE on ``labels`` (``ignore_index`` skips
    a token's CE). ``tail_bucket=True`` adds the (k+1)-th bucket term.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        teacher_ids, teacher_logprobs: ``[..., K]``; log-probs normalised over
            the teacher's full vocabulary.
        mask: per-token bool, ``True`` where the token counts.
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"``
            (per-token losses in the token shape, 0 where masked).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"``.
        memory_budget: bytes of transient chunk workspace (default 512 MiB on
            CUDA, 256 MiB on CPU).

    Returns the loss in float32 (float64 for float64 inputs).
    """
    cfg = CKDConfig(tail_coef=float(tail_coef), student_topm=student_topm,
                    kd_ratio=float(kd_ratio), temperature=float(temperature),
                    tail_bucket=bool(tail_bucket), ignore_index=ignore_index)
    _check_ckd_args(hidden, weight, teacher_ids, teacher_logprobs, mask, bias, labels,
                    cfg, reduction, memory_budget)
    backend = _backends.resolve(backend, hidden.device)
    budget = memory_budget or _backends.default_memory_budget(hidden.device)

    token_shape, k = hidden.shape[:-1], teacher_ids.shape[-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = teacher_ids.reshape(-1, k)
    lps = teacher_logprobs.reshape(-1, k)
    lab = None if labels is None or cfg.kd_ratio == 1.0 else labels.reshape(-1)
    rows = None
    if mask is not None:
        keep = mask.reshape(-1) != 0
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
            h, ids, lps = h[rows], ids[rows], lps[rows]
            lab = None if lab is None else lab[rows]
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    out = _FusedLinearCKD.apply(h, weight_c, bias, ids, lps, lab, cfg, backend, budget,
                                reduction)
    if reduction != "none":
        return out
    if rows is not None:
        out = out.new_zeros(keep.shape[0]).index_copy(0, rows, out)
    return out.reshape(token_shape)


class FusedLinearCKDLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_ckd_loss`; the knobs are fixed at construction."""

    def __init__(self, tail_coef: float = 10.0, student_topm: int = 100, kd_ratio: float = 1.0,
                 temperature: float = 1.0, reduction: str = "mean", backend: str = "auto", *,
                 tail_bucket: bool = False, ignore_index: int = -100,
                 memory_budget: int | None = None):
        super().__init__()
        self.knobs = dict(tail_coef=tail_coef, student_topm=student_topm, kd_ratio=kd_ratio,
                          temperature=temperature, reduction=reduction, backend=backend,
                          tail_bucket=tail_bucket, ignore_index=ignore_index,
                          memory_budget=memory_budget)

    def forward(self, hidden, weight, teacher_ids, teacher_logprobs, mask=None, bias=None,
                labels=None):
        return fused_linear_ckd_loss(hidden, weight, teacher_ids, teacher_logprobs,
                                     mask=mask, bias=bias, labels=labels, **self.knobs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
