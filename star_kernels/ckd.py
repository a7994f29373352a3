"""Fused linear CKD loss: hidden states + lm_head weight + teacher top-k -> loss.

No ``[tokens, vocab]`` logits are allocated: rows are processed in chunks whose
size follows ``memory_budget`` (see :mod:`star_kernels._chunked`).
"""

from __future__ import annotations

import functools

import torch

from . import _backends
from . import _validation as V
from ._chunked import cast_operands, finish_grad, rows_per_chunk, run_chunks
from ._config import CKDConfig, CKDOptions, RunOptions

REDUCTIONS = ("mean", "sum", "none")
KD_TYPES = ("fkl", "rkl", "akl")


class _CKDFunction(torch.autograd.Function):
    """Returns the reduced loss or per-row losses of the given rows: the valid tokens
    only, or all tokens with ``row_weight`` (0 for masked ones) where selecting rows
    would need a host sync.

    ``hidden``, ``weight`` and ``bias`` come in their own dtypes and are cast to the
    compute dtype here, out of autograd's sight, so their gradients (accumulated in
    fp32) are scaled and cast to each input's dtype in one pass in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_ids, teacher_logprobs, labels, row_weight,
                opts: CKDOptions):
        run, needs = opts.run, ctx.needs_input_grad
        ctx.opts = opts
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        with _backends.no_autocast(hidden.device):
            h, w, b = cast_operands(hidden, weight, bias, run.compute_dtype)
            row_op, workspace = _backends.row_functions(run.backend, "ckd")
            row_op = functools.partial(row_op, cfg=opts.cfg)
            n = h.shape[0]
            chunk = rows_per_chunk(n, w.shape[0], workspace(h.dtype), run.memory_budget)
            rows = (teacher_ids, teacher_logprobs, labels)
            out_dtype = torch.promote_types(h.dtype, torch.float32)
            with_grad = opts.reduction != "none" and any(needs[:3])
            if row_weight is None:  # every row counts
                per_row = 1.0 / max(n, 1) if opts.reduction == "mean" else 1.0
                scale = h.new_full((n,), per_row, dtype=out_dtype) if with_grad else None
            else:  # masked rows are computed but weigh 0; the count stays on the device
                row_weight = row_weight.to(out_dtype)
                per_row = (1.0 / row_weight.sum().clamp_min(1)
                           if opts.reduction == "mean" else 1.0)
                scale = row_weight * per_row if with_grad else None
            (losses,), gh, gw, gb = run_chunks(
                h, w, b, row_op, rows, scale, chunk,
                need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
        if row_weight is not None:
            losses = torch.where(row_weight > 0, losses * row_weight, 0.0)
        if opts.reduction == "none":
            # Per-token upstream gradients are only known in backward: recompute there.
            ctx.row_op, ctx.chunk = row_op, chunk
            ctx.save_for_backward(h, w, b, row_weight, *rows)
            return losses.to(out_dtype)
        ctx.save_for_backward(gh, gw, gb)
        return (losses.sum() * per_row).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad
        with _backends.no_autocast(grad_out.device):
            if ctx.opts.reduction == "none":
                h, w, b, row_weight, *rows = ctx.saved_tensors
                if row_weight is not None:
                    grad_out = grad_out * row_weight
                _, gh, gw, gb = run_chunks(
                    h, w, b, ctx.row_op, rows, grad_out, ctx.chunk,
                    need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
                scale = None
            else:
                (gh, gw, gb), scale = ctx.saved_tensors, grad_out
            grads = [finish_grad(g, dtype, scale) if need else None
                     for g, dtype, need in zip((gh, gw, gb), ctx.dtypes, needs)]
        return (*grads, None, None, None, None, None)


def _check_ckd_args(hidden, weight, teacher_ids, teacher_logprobs, mask, bias,
                    labels, cfg, reduction, memory_budget, validate):
    """Structure checks now; the value checks go into the returned collector (or none)."""
    V.check_linear(hidden, weight, bias)
    token_shape, vocab = hidden.shape[:-1], weight.shape[0]
    checks = V.value_checks(validate, "ckd", hidden.device)
    V.check_teacher(teacher_ids, teacher_logprobs, token_shape, vocab, hidden.device, checks)
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
    V.check_choice("kd_type", cfg.kd_type, KD_TYPES)
    if cfg.tail_bucket and cfg.kd_type != "fkl":
        raise ValueError(f"tail_bucket applies to kd_type='fkl' only, got "
                         f"kd_type={cfg.kd_type!r}")
    V.check_choice("reduction", reduction, REDUCTIONS)
    V.check_memory_budget(memory_budget)
    if cfg.kd_ratio < 1.0:
        if labels is None:
            raise ValueError("labels is required when kd_ratio < 1 (the CE part needs targets)")
        V.check_token_tensor("labels", labels, token_shape, hidden.device, V.INT_DTYPES)
        if checks is not None:
            V.check_ids_in_vocab(checks, "labels", labels, vocab, allow=cfg.ignore_index)
    return checks


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
    kd_type: str = "fkl",
    memory_budget: int | None = None,
    validate: str = "auto",
) -> torch.Tensor:
    """STAR's constrained knowledge-distillation loss, fused with the lm_head.

    Per valid token: ``sum_{j in S} p_j (log p_j - log q_j) + tail_coef * sum_{v in
    M \\ S} q_v`` where ``q = softmax((hidden @ weight.T + bias) / temperature)``,
    ``S`` are the teacher's ids (``-inf`` log-probs are padding) and ``M`` the
    student's ``student_topm`` most likely ids: exactly that many, the lowest ids
    first among ids tied at the m-th value. ``kd_ratio < 1`` mixes in next-token CE
    on ``labels`` (``ignore_index`` skips a token's CE). ``tail_bucket=True`` adds
    the (k+1)-th bucket term (``kd_type="fkl"`` only).

    ``kd_type`` replaces the first sum, as the released trainer's ``kd_kl_type``:
    ``"fkl"`` (above, the default), ``"rkl"`` = ``sum_{j in S} q_j (log q_j - log
    p_j)``, or ``"akl"`` = ``(g_head * fkl + g_tail * rkl) / (g_head + g_tail)``
    (a zero denominator counts as 1e-9), ``g_head`` and ``g_tail`` the sums of
    ``|p_j - q_j|`` over the head entries (in the given order, those before which
    the teacher's cumulative probability is below 0.5; the first always) and over
    the rest; its gradient flows through ``q`` in the margins and weights too.
    Padding entries add nothing to any of them.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``. Under
            ``torch.autocast`` the GEMMs run in the autocast dtype; outside it,
            mixed dtypes (bf16 hidden, fp32 weight) run in the lower precision.
            Gradients come back in each input's own dtype.
        teacher_ids, teacher_logprobs: ``[..., K]``; log-probs normalised over
            the teacher's full vocabulary (not logits: values above 0 or more
            than 1% excess probability mass per token are rejected).
        mask: per-token bool, ``True`` where the token counts. Selecting the
            valid rows costs one host synchronisation (their count), which
            skipping the others' GEMMs repays; pass only the valid rows and
            ``mask=None`` for a call without any. Where a synchronisation is not
            allowed (CUDA graph capture, ``torch.compile`` tracing) masked rows
            are computed and weighted 0 instead.
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"``
            (per-token losses in the token shape, 0 where masked).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"``.
        memory_budget: bytes of transient chunk workspace (default 512 MiB on
            CUDA, 256 MiB on CPU).
        validate: value checks of the inputs (ids in range, finite teacher
            log-probs that are log-probabilities, no repeated ids): ``"auto"``
            (every call on CPU; on CUDA the first call only, so later calls
            do not synchronise with the host), ``"full"`` or ``"shapes"`` (none).
            Shapes, dtypes, devices and knobs are always checked.

    Returns the loss in float32 (float64 for float64 inputs).
    """
    cfg = CKDConfig(tail_coef=float(tail_coef), student_topm=student_topm,
                    kd_ratio=float(kd_ratio), temperature=float(temperature),
                    tail_bucket=bool(tail_bucket), ignore_index=ignore_index,
                    kd_type=kd_type)
    checks = _check_ckd_args(hidden, weight, teacher_ids, teacher_logprobs, mask, bias, labels,
                             cfg, reduction, memory_budget, validate)
    backend = _backends.resolve(backend, hidden.device)
    dtype = _backends.compute_dtype(hidden, weight, bias)
    if checks is not None:
        checks.run()
    budget = memory_budget or _backends.default_memory_budget(hidden.device)
    opts = CKDOptions(RunOptions(backend, budget, dtype), cfg, reduction)

    token_shape, k = hidden.shape[:-1], teacher_ids.shape[-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = teacher_ids.reshape(-1, k)
    lps = teacher_logprobs.reshape(-1, k)
    lab = None if labels is None or cfg.kd_ratio == 1.0 else labels.reshape(-1)
    rows = row_weight = None
    if mask is not None:
        keep = mask.reshape(-1) != 0
        if _backends.host_sync_forbidden(hidden.device):
            row_weight = keep  # no row selection: masked rows run too, weighted 0
        else:
            rows = keep.nonzero().squeeze(1)  # the mask's one host synchronisation
            h, ids, lps = h[rows], ids[rows], lps[rows]
            lab = None if lab is None else lab[rows]
    out = _CKDFunction.apply(h, weight, bias, ids, lps, lab, row_weight, opts)
    if reduction != "none":
        return out
    if rows is not None:
        out = out.new_zeros(keep.shape[0]).index_copy(0, rows, out)
    return out.reshape(token_shape)


class FusedLinearCKDLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_ckd_loss`; the knobs are fixed at construction."""

    def __init__(self, tail_coef: float = 10.0, student_topm: int = 100, kd_ratio: float = 1.0,
                 temperature: float = 1.0, reduction: str = "mean", backend: str = "auto", *,
                 tail_bucket: bool = False, ignore_index: int = -100, kd_type: str = "fkl",
                 memory_budget: int | None = None, validate: str = "auto"):
        super().__init__()
        self.knobs = dict(tail_coef=tail_coef, student_topm=student_topm, kd_ratio=kd_ratio,
                          temperature=temperature, reduction=reduction, backend=backend,
                          tail_bucket=tail_bucket, ignore_index=ignore_index,
                          kd_type=kd_type, memory_budget=memory_budget, validate=validate)

    def forward(self, hidden, weight, teacher_ids, teacher_logprobs, mask=None, bias=None,
                labels=None):
        return fused_linear_ckd_loss(hidden, weight, teacher_ids, teacher_logprobs,
                                     mask=mask, bias=bias, labels=labels, **self.knobs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
