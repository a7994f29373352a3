"""Row ops in plain PyTorch: the chunked "torch" backend (any device).

Each function follows the row-op contract of :mod:`star_kernels._chunked`. Work is
done in float32 (float64 when the logits are float64) whatever the input dtype.
"""

from __future__ import annotations

import torch

from ._config import CKDConfig


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ckd_workspace_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit this op needs: the chunk, a float copy, a float and a bool mask."""
    item = torch.empty((), dtype=dtype).element_size()
    float_copy = 0 if dtype in (torch.float32, torch.float64) else 4
    return item + float_copy + 2 * _compute_dtype(dtype).itemsize + 1


def ckd_rows(logits, teacher_ids, teacher_logprobs, labels, grad_scale, *, cfg: CKDConfig):
    """Per-row CKD loss of a ``[C, V]`` logits chunk, and its gradient in place."""
    ctype = _compute_dtype(logits.dtype)
    z = logits if logits.dtype == ctype else logits.to(ctype)
    if cfg.temperature != 1.0:
        z.mul_(1.0 / cfg.temperature)
    lam, mix = cfg.tail_coef, cfg.kd_ratio

    threshold = z.topk(cfg.student_topm, dim=1, sorted=False).values.amin(1, keepdim=True)
    lse = torch.logsumexp(z, 1, keepdim=True)
    ids = teacher_ids.long()
    tlp = teacher_logprobs.to(ctype)
    ranked = torch.isfinite(tlp)
    p = torch.where(ranked, tlp.exp(), 0.0)
    z_s = z.gather(1, ids)
    logq_s = z_s - lse
    q_s = torch.where(ranked, logq_s.exp(), 0.0)
    fkl = torch.where(ranked, p * (tlp - logq_s), 0.0).sum(1)
    s_confident = ranked & (z_s >= threshold)
    if mix < 1.0:
        keep = (labels != cfg.ignore_index).to(ctype)
        safe_labels = torch.where(keep > 0, labels, 0).long()[:, None]
        ce = torch.where(keep > 0, lse[:, 0] - z.gather(1, safe_labels)[:, 0], 0.0)

    confident = (z >= threshold).to(ctype)
    q = z.sub_(lse).exp_()
    confident_mass = torch.bmm(q.unsqueeze(1), confident.unsqueeze(2)).view(-1)
    mistake_mass = confident_mass - (q_s * s_confident).sum(1)
    loss = fkl + lam * mistake_mass

    tail_ratio = torch.zeros_like(fkl)
    teacher_mass, student_mass = p.sum(1), q_s.sum(1)
    if cfg.tail_bucket:
        p_tail = (1.0 - teacher_mass).clamp_min(0.0)
        q_tail = (1.0 - student_mass).clamp_min(torch.finfo(ctype).tiny)
        loss = loss + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)
        tail_ratio = p_tail / q_tail
    if mix < 1.0:
        loss = mix * loss + (1.0 - mix) * ce

    if grad_scale is None:
        return (loss,), None

    # d loss / d u_v = q_v * (dense + lam*mix*[v in M]) + sparse corrections at
    # teacher ids and the label, with u = z / T (so a final 1/T).
    s = grad_scale.to(ctype) / cfg.temperature
    dense = mix * (teacher_mass - lam * mistake_mass - tail_ratio * student_mass)
    if mix < 1.0:
        dense = dense + (1.0 - mix) * keep
    dense = dense * s
    g = q.mul_(confident.mul_((mix * lam) * s[:, None]).add_(dense[:, None]))
    at_teacher = mix * (tail_ratio[:, None] * q_s - p - lam * q_s * s_confident)
    g.scatter_add_(1, ids, at_teacher * s[:, None])
    if mix < 1.0:
        g.scatter_add_(1, safe_labels, (-(1.0 - mix) * s * keep)[:, None])
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    return (loss,), logits
