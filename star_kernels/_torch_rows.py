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
    """Bytes per logit this op needs: the chunk, a float copy, a bool mask, q on M."""
    item = torch.empty((), dtype=dtype).element_size()
    float_copy = 0 if dtype in (torch.float32, torch.float64) else 4
    return item + float_copy + _compute_dtype(dtype).itemsize + 1


def kd_divergence(kd_type, p, tlp, logq_s, q_s, ranked, fkl):
    """The divergence over the teacher entries (``[C]``) and its derivative in each
    entry's ``log q_j`` (``[C, K]``, 0 at padding), for ``kd_type`` fkl / rkl / akl.

    With ``G_j`` that derivative, the divergence's gradient in the scaled logits is
    ``G_j`` at the teacher ids minus ``q_v * sum_j G_j`` everywhere (fkl: ``G = -p``).
    """
    if kd_type == "fkl":
        return fkl, -p
    r_terms = q_s * (torch.where(ranked, logq_s, 0.0) - torch.where(ranked, tlp, 0.0))
    rkl = r_terms.sum(1)
    d_rkl = r_terms + q_s  # q (log q - log p + 1)
    if kd_type == "rkl":
        return rkl, d_rkl
    # akl: margins |p - q| weigh fkl on the head entries and rkl on the tail ones.
    head = (p.cumsum(1) - p) < 0.5
    head[:, 0] = True
    diff = p - q_s  # 0 at padding (p = q_s = 0 there)
    margin = diff.abs()
    g_head = (margin * head).sum(1)
    g_tail = (margin * ~head).sum(1)
    total = g_head + g_tail
    total = torch.where(total != 0, total, 1e-9)[:, None]
    akl = (g_head * fkl + g_tail * rkl) / total[:, 0]
    # d margin_j / d log q_j = -sign(p_j - q_j) q_j (0 at a zero margin, as autograd).
    weight = torch.where(head, fkl[:, None], rkl[:, None]) - akl[:, None]
    grad = (g_tail[:, None] * d_rkl - g_head[:, None] * p
            - torch.sign(diff) * q_s * weight) / total
    return akl, grad


def _trim_ties(z, confident, threshold, excess, rows=None, block: int = 8192):
    """Drop the ``excess`` highest tied ids (value == threshold) from ``confident``,
    through ``[C, block]`` temporaries (a running count of ties from the row's end).
    ``rows``: only these rows of ``z`` and ``confident`` (``threshold`` and ``excess`` are
    given for them alone); all rows when ``None``."""
    seen = torch.zeros_like(excess)
    for end in range(z.shape[1], 0, -block):
        cols = slice(max(0, end - block), end)
        at = (slice(None), cols) if rows is None else (rows, cols)
        tie = z[at] == threshold
        from_end = tie.flip(1).cumsum(1, dtype=torch.int32).flip(1) + seen[:, None]
        confident[at] &= ~(tie & (from_end <= excess[:, None]))
        seen += tie.sum(1, dtype=torch.int32)


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` from Python costs nothing: on a CPU tensor outside
    torch.compile. (On an accelerator it is a synchronisation, under torch.compile a graph
    break: the ops' hot path makes none there.)"""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def top_m_mask(z, m: int) -> torch.Tensor:
    """``[C, V]`` bool: each row's ``m`` largest values, exactly ``m`` ids; among ids tied
    at the m-th value the lowest ids are taken (the fixed tie rule of every backend)."""
    if not host_reads_are_free(z) or m >= z.shape[1]:
        # Deciding which rows need a trim would read a value on the host, a
        # synchronisation on accelerators and a graph break under torch.compile: every
        # row is trimmed (a no-op for rows without excess ties).
        threshold = z.topk(m, dim=1, sorted=False).values.amin(1, keepdim=True)
        confident = z >= threshold
        _trim_ties(z, confident, threshold, confident.sum(1, dtype=torch.int32) - m)
        return confident
    # On the CPU that read is free, and fp32 rows rarely tie: only rows whose (m+1)-th
    # value equals their m-th are trimmed. (Counting the mask of every row costs more
    # than the compare that builds it; trimming every row added ~20% to the whole op:
    # benchmarks/results/fkl-exact-topm.)
    top = z.topk(m + 1, dim=1, sorted=False).values
    next_value, threshold = top.topk(2, dim=1, largest=False).values.unbind(1)
    threshold = threshold[:, None]
    confident = z >= threshold
    rows = (next_value == threshold[:, 0]).nonzero()[:, 0]
    if len(rows):
        excess = confident[rows].sum(1, dtype=torch.int32) - m
        _trim_ties(z, confident, threshold[rows], excess, rows)
    return confident


def teacher_terms(teacher_logprobs, logq_s, ctype):
    """The row terms at the teacher's entries: ``(tlp, ranked, p, q_s, fkl)``: the teacher's
    log-probs in ``ctype``, which entries are real (not -inf padding), the teacher's and
    the student's probabilities there (0 at padding) and the forward KL over them."""
    tlp = teacher_logprobs.to(ctype)
    ranked = torch.isfinite(tlp)
    p = torch.where(ranked, tlp.exp(), 0.0)
    q_s = torch.where(ranked, logq_s.exp(), 0.0)
    fkl = torch.where(ranked, p * (tlp - logq_s), 0.0).sum(1)
    return tlp, ranked, p, q_s, fkl


def ckd_row_loss(cfg: CKDConfig, tlp, ranked, p, logq_s, q_s, fkl, mistake_mass, ce):
    """Per-row CKD loss from the row statistics (the divergence on the teacher's entries,
    ``tail_coef`` x the confident-error mass, the tail bucket, the CE mix), and the terms
    its gradient needs: ``(loss, (g_div, mistake_mass, tail_ratio, student_mass))``."""
    div, g_div = kd_divergence(cfg.kd_type, p, tlp, logq_s, q_s, ranked, fkl)
    loss = div + cfg.tail_coef * mistake_mass
    tail_ratio = torch.zeros_like(fkl)
    student_mass = q_s.sum(1)
    if cfg.tail_bucket:
        p_tail = (1.0 - p.sum(1)).clamp_min(0.0)
        q_tail = (1.0 - student_mass).clamp_min(torch.finfo(fkl.dtype).tiny)
        loss = loss + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)
        tail_ratio = p_tail / q_tail
    if cfg.kd_ratio < 1.0:
        loss = cfg.kd_ratio * loss + (1.0 - cfg.kd_ratio) * ce
    return loss, (g_div, mistake_mass, tail_ratio, student_mass)


def ckd_row_grad(cfg: CKDConfig, grad_scale, q_s, s_confident, g_div, mistake_mass, tail_ratio,
                 student_mass, keep, ctype):
    """The gradient in the logits u = z / T, per row: d loss / d u_v = q_v * (dense +
    lam*mix*[v in M]) + sparse corrections at the teacher ids and the label (so a final
    1/T). Returns ``(s, dense, at_teacher, at_label)``: the row scale grad_scale / T,
    ``dense`` (times s), the corrections at the teacher ids and (CE mix only, else None)
    at the label, both times s."""
    lam, mix = cfg.tail_coef, cfg.kd_ratio
    s = grad_scale.to(ctype) / cfg.temperature
    dense = mix * (-g_div.sum(1) - lam * mistake_mass - tail_ratio * student_mass)
    if mix < 1.0:
        dense = dense + (1.0 - mix) * keep
    at_teacher = mix * (tail_ratio[:, None] * q_s + g_div - lam * q_s * s_confident)
    at_label = (-(1.0 - mix) * s * keep)[:, None] if mix < 1.0 else None
    return s, dense * s, at_teacher * s[:, None], at_label


def ckd_rows(logits, teacher_ids, teacher_logprobs, labels, grad_scale, *, cfg: CKDConfig):
    """Per-row CKD loss of a ``[C, V]`` logits chunk, and its gradient in place."""
    ctype = _compute_dtype(logits.dtype)
    z = logits if logits.dtype == ctype else logits.to(ctype)
    if cfg.temperature != 1.0:
        z.mul_(1.0 / cfg.temperature)
    lam, mix = cfg.tail_coef, cfg.kd_ratio

    confident = top_m_mask(z, cfg.student_topm)
    ids = teacher_ids.long()
    z_s = z.gather(1, ids)
    if mix < 1.0:
        keep = (labels != cfg.ignore_index).to(ctype)
        safe_labels = torch.where(keep > 0, labels, 0).long()[:, None]
        z_label = z.gather(1, safe_labels)[:, 0]

    # Softmax in place, one pass per step (torch.logsumexp would add temporaries).
    row_max = z.amax(1, keepdim=True)
    q = z.sub_(row_max).exp_()
    sum_exp = q.sum(1, keepdim=True)
    q.mul_(sum_exp.reciprocal())
    lse = row_max + sum_exp.log()

    logq_s = z_s - lse
    tlp, ranked, p, q_s, fkl = teacher_terms(teacher_logprobs, logq_s, ctype)
    s_confident = ranked & confident.gather(1, ids)
    ce = keep * (lse[:, 0] - z_label) if mix < 1.0 else None
    q_confident = torch.where(confident, q, 0.0)  # q on M; reused by the gradient
    mistake_mass = q_confident.sum(1) - (q_s * s_confident).sum(1)
    loss, grad_terms = ckd_row_loss(cfg, tlp, ranked, p, logq_s, q_s, fkl, mistake_mass, ce)
    if grad_scale is None:
        return (loss,), None

    s, dense, at_teacher, at_label = ckd_row_grad(cfg, grad_scale, q_s, s_confident, *grad_terms,
                                                  keep if mix < 1.0 else None, ctype)
    g = q.mul_(dense[:, None]).addcmul_(q_confident, (mix * lam) * s[:, None])
    g.scatter_add_(1, ids, at_teacher)
    if at_label is not None:
        g.scatter_add_(1, safe_labels, at_label)
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    return (loss,), logits


# ---------------------------------------------------------------------------
# Top-k log-probs and per-token log-probs / entropy (same contracts as the
# C++ rows in _cpp_rows.py; the op modules adapt them to the chunk loop).


def topk_workspace_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit for :func:`topk_rows`: the chunk, a float copy, logsumexp's buffer."""
    item = torch.empty((), dtype=dtype).element_size()
    float_copy = 0 if dtype in (torch.float32, torch.float64) else 4
    return item + float_copy + _compute_dtype(dtype).itemsize


def topk_rows(logits, k: int, temperature: float):
    """The ``k`` largest log-probs of ``log_softmax(logits / temperature)`` per row.

    Returns ``(ids int64 [C, k], logprobs float32 [C, k])`` sorted descending;
    equal values keep ascending id order.
    """
    ctype = _compute_dtype(logits.dtype)
    z = logits.to(ctype)  # the chunk itself when already float32/64 (it is scratch)
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, 1, keepdim=True)
    # torch.topk's order among equal values is unspecified: order the winners by
    # id, then stable-sort them by value so equal values list ascending ids.
    vals, ids = z.topk(k, dim=1, sorted=False)
    ids, order = ids.sort(1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    return ids, (vals - lse).float()


def logprob_workspace_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit for :func:`logprob_rows`: the chunk, a float copy, one float buffer."""
    item = torch.empty((), dtype=dtype).element_size()
    float_copy = 0 if dtype in (torch.float32, torch.float64) else 4
    return item + float_copy + _compute_dtype(dtype).itemsize


def _row_dot(a: torch.Tensor, b: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Row-wise dot products of two ``[C, V]`` tensors through ``[C, block]`` temporaries.

    Not ``bmm`` of ``[C, 1, V] x [C, V, 1]``: on CPU its fp32 accumulation over the
    vocabulary was off by 9e-4 on an entropy of 4.3 (SmolLM2-135M, V = 49,152), while
    ``sum`` reduces pairwise (1e-5); the column blocks keep the extra memory small.
    """
    out = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[1], block):
        out += (a[:, start:start + block] * b[:, start:start + block]).sum(1)
    return out


def logprob_rows(logits, token_ids, temperature: float, want_entropy: bool,
                 grad_logp=None, grad_entropy=None):
    """Per-row ``log q[id]`` (and entropy of ``q``) for ``q = softmax(logits / T)``.

    Returns ``(logp [C], entropy [C] or None, dlogits or None)``. When
    ``grad_logp`` (or ``grad_entropy``) is given, ``logits`` is overwritten with
    d(sum_r grad_logp[r] * logp[r] + grad_entropy[r] * H[r]) / d(logits)
    ``= (grad_logp * (onehot - q) - grad_entropy * q * (log q + H)) / T``;
    a missing one of the two counts as zero. ``grad_logp`` may also be a callable
    of ``logp`` (the fused GRPO loss knows its upstream gradient only then).
    """
    ctype = _compute_dtype(logits.dtype)
    z = logits if logits.dtype == ctype else logits.to(ctype)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    ids = token_ids.long()[:, None]
    # log-softmax in place; q is the one extra buffer.
    z.sub_(z.amax(1, keepdim=True))
    q = z.exp()
    sum_exp = q.sum(1, keepdim=True)
    logq = z.sub_(sum_exp.log())
    logp = logq.gather(1, ids)[:, 0]
    if callable(grad_logp):  # an upstream gradient that depends on the log-probs
        grad_logp = grad_logp(logp)
    with_grad = grad_logp is not None or grad_entropy is not None
    if not (want_entropy or with_grad):
        return logp, None, None
    q.div_(sum_exp)
    # A -inf logit (a masked vocabulary row) has q = 0 and log q = -inf, and 0 * -inf
    # is NaN in the entropy and its gradient: floor log q where q underflows to 0 anyway
    # (exp(-1e4) is 0 in float32 and float64), so those terms are exactly 0.
    logq.clamp_min_(-1e4)
    entropy = -_row_dot(q, logq)
    if not with_grad:
        return logp, (entropy if want_entropy else None), None
    inv_t = 1.0 / temperature
    if grad_entropy is not None:
        ge = grad_entropy.to(ctype)[:, None] * inv_t
        # -ge * q * (log q + H) - gl * q, built in the log q buffer.
        g = logq.add_(entropy[:, None]).mul_(-ge)
        if grad_logp is not None:
            g.sub_(grad_logp.to(ctype)[:, None] * inv_t)
        g.mul_(q)
    else:
        g = q.mul_(-grad_logp.to(ctype)[:, None] * inv_t)
    if grad_logp is not None:
        g.scatter_add_(1, ids, grad_logp.to(ctype)[:, None] * inv_t)
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    return logp, (entropy if want_entropy else None), logits
