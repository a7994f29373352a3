"""Plain full-logits PyTorch implementations: the ground truth for every op.

These materialise ``[tokens, vocab]`` logits and let autograd differentiate them.
They are slow and memory hungry by design; tests run them in float64 and compare
every fused backend against them, and the benchmarks time them as the naive
baseline. Nothing here shares code with the fused ops.

Each public op has a function of the same name and arguments
(:func:`fused_linear_ckd_loss`, :func:`fused_linear_topk_logprobs`,
:func:`fused_linear_logprobs`, :func:`fused_linear_grpo_loss`); ``backend``,
``memory_budget`` and ``validate`` are accepted and ignored so a call can be
pointed at either. The logits are formed in the inputs' dtype (pass float64
tensors for the ground truth) and the softmax runs in at least float32. The
per-row functions (``*_from_logits``, :func:`ckd_token_losses`) take ``[N, V]``
logits directly, for tests of the row kernels. The reference does not validate
its inputs and does not handle autocast.
"""

from __future__ import annotations

import torch

_IGNORED = ("backend", "memory_budget", "validate")


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def linear_logits(hidden, weight, bias=None):
    """Flat ``[N, V]`` logits of ``hidden`` (``[N, H]`` or ``[B, T, H]``) in its dtype."""
    # F.linear adds the bias inside the GEMM (one rounding in 16-bit), as the fused ops do.
    return torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)


def full_logprobs(hidden, weight, bias=None, temperature=1.0, dtype=None):
    """``log_softmax(logits / temperature)`` of flat rows; ``dtype`` is the softmax's dtype
    (default: the logits' dtype, at least float32)."""
    logits = linear_logits(hidden, weight, bias)
    logits = logits.to(dtype or _softmax_dtype(logits.dtype))
    return torch.log_softmax(logits / temperature, dim=-1)


# ----------------------------------------------------------------------------- CKD


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
    kd_type: str = "fkl",
) -> torch.Tensor:
    """Per-token CKD loss from full logits ``[N, V]``; returns ``[N]``.

    ``kd_type`` is the divergence over the teacher's k entries S (``p`` teacher,
    ``q`` student probabilities, both full-vocabulary normalised): ``"fkl"`` =
    ``sum_S p (log p - log q)``, ``"rkl"`` = ``sum_S q (log q - log p)``, ``"akl"`` =
    ``(g_head * fkl + g_tail * rkl) / (g_head + g_tail)`` (a zero denominator counts
    as 1e-9) with ``g_head`` / ``g_tail`` the sums of ``|p_j - q_j|`` over the head
    entries (those, in the given order, before which the teacher's cumulative mass
    is below 0.5; the first entry always) and the others. Autograd differentiates
    all of it, margins and weights included.

    The student's confident set M holds exactly ``student_topm`` ids: the largest
    scaled logits, and among ids tied at the m-th value the lowest ids. Teacher
    entries with a ``-inf`` log-prob are padding: they are not in S and add nothing.
    """
    logits = logits.to(_softmax_dtype(logits.dtype))
    logq = torch.log_softmax(logits / temperature, dim=-1)
    q = logq.exp()
    teacher_logprobs = teacher_logprobs.to(logq.dtype)
    finite = torch.isfinite(teacher_logprobs)
    p = torch.where(finite, teacher_logprobs.exp(), torch.zeros_like(teacher_logprobs))
    safe_lp = torch.where(finite, teacher_logprobs, torch.zeros_like(teacher_logprobs))
    logq_s = logq.gather(1, teacher_ids)
    fkl = (p * (safe_lp - logq_s)).sum(1)
    div = fkl
    if kd_type != "fkl":
        q_s = torch.where(finite, logq_s.exp(), torch.zeros_like(logq_s))
        rkl = (q_s * (logq_s - safe_lp)).sum(1)
    if kd_type == "rkl":
        div = rkl
    elif kd_type == "akl":
        before = p.cumsum(1) - p  # teacher mass of the entries before each one
        head = before < 0.5
        head[:, 0] = True
        margin = (p - q_s).abs()
        g_head = (margin * head).sum(1)
        g_tail = (margin * ~head).sum(1)
        total = g_head + g_tail
        total = torch.where(total != 0, total, torch.full_like(total, 1e-9))
        div = (g_head * fkl + g_tail * rkl) / total

    hits = torch.zeros(logits.shape, dtype=torch.uint8, device=logits.device)
    in_teacher = hits.scatter_reduce_(1, teacher_ids, finite.to(torch.uint8), "amax").bool()
    with torch.no_grad():
        scaled = logits.detach() / temperature
        # A stable descending sort lists equal values by ascending id.
        order = scaled.argsort(dim=1, descending=True, stable=True)[:, :student_topm]
        confident = torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, order, True)
    mistakes = confident & ~in_teacher
    mistake_mass = (q * mistakes).sum(1)
    kd = div + tail_coef * mistake_mass

    if tail_bucket:
        if kd_type != "fkl":
            raise ValueError("tail_bucket applies to kd_type='fkl' only")
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
    tail_coef: float = 10.0,
    student_topm: int = 100,
    kd_ratio: float = 1.0,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str | None = None,
    *,
    tail_bucket: bool = False,
    ignore_index: int = -100,
    kd_type: str = "fkl",
    **ignored,
) -> torch.Tensor:
    """Reference for :func:`star_kernels.fused_linear_ckd_loss` (same arguments)."""
    _check_ignored(ignored)
    token_shape = hidden.shape[:-1]
    k = teacher_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    per_token = ckd_token_losses(
        linear_logits(hidden, weight, bias), teacher_ids.reshape(-1, k),
        teacher_logprobs.reshape(-1, k), tail_coef=tail_coef, student_topm=student_topm,
        kd_ratio=kd_ratio, labels=flat_labels, temperature=temperature,
        tail_bucket=tail_bucket, ignore_index=ignore_index, kd_type=kd_type)
    keep = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.reshape(-1) != 0
    per_token = per_token * keep
    if reduction == "none":
        return per_token.reshape(token_shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / keep.sum().clamp_min(1)


def _check_ignored(ignored):
    unknown = set(ignored) - set(_IGNORED)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")


# ----------------------------------------------------------------------------- top-k


def topk_from_logits(logits, k, temperature=1.0):
    """Top-``k`` of ``log_softmax(logits / temperature)`` per row, sorted descending.

    Equal values list ascending ids; which of several ids tied at the k-th value
    are kept is unspecified (as for ``torch.topk``). Returns ``(ids int64, logprobs)``.
    """
    logq = torch.log_softmax(logits.to(_softmax_dtype(logits.dtype)) / temperature, dim=-1)
    vals, ids = logq.topk(k, dim=-1)
    ids, order = ids.sort(dim=-1)
    vals = vals.gather(-1, order)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), vals


def fused_linear_topk_logprobs(hidden, weight, k, temperature=1.0, bias=None, **ignored):
    """Reference for :func:`star_kernels.fused_linear_topk_logprobs` (exact top-k only)."""
    _check_ignored(ignored)
    ids, vals = topk_from_logits(linear_logits(hidden, weight, bias), k, temperature)
    shape = (*hidden.shape[:-1], k)
    return ids.reshape(shape), vals.reshape(shape)


# ----------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits, token_ids, temperature=1.0):
    """``(log q[id], entropy of q)`` per row for ``q = softmax(logits / temperature)``.

    ``-inf`` logits (masked vocabulary entries) add nothing to the entropy.
    """
    logq = torch.log_softmax(logits.to(_softmax_dtype(logits.dtype)) / temperature, dim=-1)
    q = logq.exp()
    logp = logq.gather(-1, token_ids[..., None].long())[..., 0]
    entropy = -(q * torch.where(q > 0, logq, 0.0)).sum(-1)
    return logp, entropy


def fused_linear_logprobs(hidden, weight, token_ids, temperature=1.0, return_entropy=False,
                          bias=None, **ignored):
    """Reference for :func:`star_kernels.fused_linear_logprobs` (same arguments)."""
    _check_ignored(ignored)
    logp, entropy = logprobs_from_logits(linear_logits(hidden, weight, bias),
                                         token_ids.reshape(-1), temperature)
    shape = hidden.shape[:-1]
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)


# ----------------------------------------------------------------------------- GRPO


def kl_estimate(logp, ref_logprobs, kl_estimator="k2", kl_clamp=None):
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs; its value is
    clamped to ``[-kl_clamp, kl_clamp]`` unless ``kl_clamp`` is ``None``."""
    if kl_estimator == "k1":
        kl = logp - ref_logprobs
    elif kl_estimator == "k2":
        kl = 0.5 * (logp - ref_logprobs) ** 2
    else:
        kl = torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1
    return kl if kl_clamp is None else torch.clamp(kl, -kl_clamp, kl_clamp)


def grpo_token_losses(logp, advantages, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                      kl_coef=1e-3, kl_estimator="k2", kl_clamp=None):
    """Per-token PPO-clipped surrogate plus ``kl_coef`` times the KL estimate.

    ``old_logprobs=None`` is on-policy: ``ratio = exp(logp - logp.detach())``.
    """
    low, high = clip_eps if isinstance(clip_eps, (tuple, list)) else (clip_eps, clip_eps)
    old = logp.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logp - old)
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - low, 1 + high) * advantages)
    if ref_logprobs is not None and kl_coef:
        loss = loss + kl_coef * kl_estimate(logp, ref_logprobs, kl_estimator, kl_clamp)
    return loss


def fused_linear_grpo_loss(hidden, weight, token_ids, advantages, mask, old_logprobs=None,
                           ref_logprobs=None, clip_eps=0.2, kl_coef=1e-3, kl_estimator="k2",
                           temperature=1.0, loss_agg="token_mean", bias=None, kl_clamp=10.0,
                           **ignored):
    """Reference for :func:`star_kernels.fused_linear_grpo_loss`: ``(loss, diagnostics)``.

    Written with masks instead of row selection, so ``torch.compile`` takes it whole.
    """
    _check_ignored(ignored)
    shape = token_ids.shape
    keep = mask != 0
    logp = fused_linear_logprobs(hidden, weight, torch.where(keep, token_ids, 0),
                                 temperature=temperature, bias=bias)
    if advantages.dim() == 1 and len(shape) == 2:
        advantages = advantages[:, None].expand(shape)
    def fill(t):
        return None if t is None else torch.where(keep, t, 0.0).to(logp.dtype)
    adv, old, ref = fill(advantages), fill(old_logprobs), fill(ref_logprobs)
    tok = torch.where(keep, grpo_token_losses(logp, adv, old, ref, clip_eps, kl_coef,
                                              kl_estimator, kl_clamp), 0.0)
    count = keep.sum().clamp_min(1)
    if loss_agg == "token_mean":
        loss = tok.sum() / count
    elif loss_agg == "dr_grpo":
        loss = tok.sum() / keep.numel()
    else:  # mean over sequences with a token of each sequence's masked mean
        rows_tok, rows_keep = tok.reshape(-1, shape[-1]), keep.reshape(-1, shape[-1])
        lengths = rows_keep.sum(-1)
        per_seq = rows_tok.sum(-1) / lengths.clamp_min(1)
        loss = per_seq.sum() / (lengths > 0).sum().clamp_min(1)

    with torch.no_grad():
        low, high = clip_eps if isinstance(clip_eps, (tuple, list)) else (clip_eps, clip_eps)
        lp = logp.detach()
        ratio = torch.ones_like(lp) if old is None else torch.exp(lp - old)
        clipped = ((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        kl = torch.zeros_like(lp) if ref is None else kl_estimate(lp, ref, kl_estimator, kl_clamp)

        def token_mean(x):
            return torch.where(keep, x.to(lp.dtype), 0.0).sum() / count
        diagnostics = {"clip_fraction": token_mean(clipped), "mean_kl": token_mean(kl),
                       "mean_ratio": token_mean(ratio),
                       "logprobs": torch.where(keep, lp, 0.0)}
    return loss, diagnostics
