"""Plain full-logits PyTorch implementations: the ground truth for every op.

These materialise ``[tokens, vocab]`` logits and let autograd differentiate them.
They are slow and memory hungry by design; tests run them in float64 and compare
every fused backend against them.
"""

from __future__ import annotations

import torch


def ckd_token_losses(
    logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    tail_coef: float = 10.0,
    student_topm: int = 100,
    kd_ratio: float = 1.0,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail_bucket: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token CKD loss from full logits ``[N, V]``; returns ``[N]``.

    The student's confident set M holds every id whose scaled logit is at least
    the m-th largest one (ties at the threshold are all included). Teacher
    entries with a ``-inf`` log-prob are padding: they are not in S and add nothing.
    """
    logq = torch.log_softmax(logits / temperature, dim=-1)
    q = logq.exp()
    finite = torch.isfinite(teacher_logprobs)
    p = torch.where(finite, teacher_logprobs.exp(), torch.zeros_like(teacher_logprobs))
    safe_lp = torch.where(finite, teacher_logprobs, torch.zeros_like(teacher_logprobs))
    logq_s = logq.gather(1, teacher_ids)
    fkl = (p * (safe_lp - logq_s)).sum(1)

    hits = torch.zeros(logits.shape, dtype=torch.uint8, device=logits.device)
    in_teacher = hits.scatter_reduce_(1, teacher_ids, finite.to(torch.uint8), "amax").bool()
    with torch.no_grad():
        scaled = logits.detach() / temperature
        threshold = scaled.topk(student_topm, dim=1).values[:, -1:]
        confident = scaled >= threshold
    mistakes = confident & ~in_teacher
    mistake_mass = (q * mistakes).sum(1)
    kd = fkl + tail_coef * mistake_mass

    if tail_bucket:
        p_tail = (1.0 - p.sum(1)).clamp_min(0.0)
        q_tail = (q * ~in_teacher).sum(1)
        kd = kd + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)

    if kd_ratio < 1.0:
        keep = labels != ignore_index
        ce = -logq.gather(1, labels.clamp_min(0)[:, None])[:, 0] * keep
        return kd_ratio * kd + (1.0 - kd_ratio) * ce
    return kd


def fused_linear_ckd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    **knobs,
) -> torch.Tensor:
    """Reference for :func:`star_kernels.fused_linear_ckd_loss` (same arguments)."""
    token_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    k = teacher_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    per_token = ckd_token_losses(
        logits, teacher_ids.reshape(-1, k), teacher_logprobs.reshape(-1, k),
        labels=flat_labels, **knobs,
    )
    keep = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.reshape(-1)
    per_token = per_token * keep
    if reduction == "none":
        return per_token.reshape(token_shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / keep.sum().clamp_min(1)
