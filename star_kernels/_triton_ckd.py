"""Triton row op for the CKD loss: one program per row of a logits chunk.

Per row, in passes over the vocabulary (the row of logits is read in its own
dtype and the gradient written back over it, so the chunk is the only workspace):

1. online logsumexp, fused with a 256-bin histogram of the top 8 bits of each
   logit's order-preserving integer key;
2. radix-select refinement: histograms of the next 8 key bits, restricted to the
   bin that holds the m-th largest logit, one level per pass until the threshold
   is exact (bf16/fp16 logits: one more pass; fp32: at most three; a level is
   skipped once the bin's count lands on m);
3. the student's confident mass ``sum q_v`` over keys >= threshold;
4. the gradient, dense part written in place, then the teacher ids and the label
   patched (read-modify-write after a barrier).

This finds the m-th largest logit without sorting or ``torch.topk`` over the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import CKDConfig

# 8-bit digits: a 256-bin histogram per pass is cheap on GPUs (tl.histogram's cost
# grows with the bin count); 16-bit logits need two levels, fp32 at most four.
RADIX_BITS = 8


@triton.jit
def _order_key(x):
    """uint32 key whose unsigned order is the float order of ``x`` (fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # all ones for negatives, sign bit otherwise
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _pick_bin(hist, rank, NB: tl.constexpr):
    """Highest bin whose count of elements at or above it reaches ``rank``.

    Returns (bin, elements strictly above the bin, elements in the bin)."""
    bins = tl.arange(0, NB)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    b = tl.max(tl.where(at_or_above >= rank, bins, -1), 0)
    in_bin = tl.sum(tl.where(bins == b, hist, 0), 0)
    above = tl.sum(tl.where(bins == b, at_or_above, 0), 0) - in_bin
    return b, above, in_bin


@triton.jit
def _refine(row_ptr, V, inv_t, prefix, shift: tl.constexpr, in_prefix,
            BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Histogram of the digit at ``shift`` over elements whose higher key bits equal ``prefix``."""
    NB: tl.constexpr = 1 << RADIX_BITS
    hist = tl.zeros((NB,), dtype=tl.int32)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, n_blocks):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32) * inv_t
        key = _order_key(x)
        keep = (offs < V) & ((key >> (shift + RADIX_BITS)) == prefix)
        digit = tl.where(keep, (key >> shift) & (NB - 1), 0).to(tl.int32)
        hist += tl.histogram(digit, NB)
    # Elements outside the prefix (and padding) were counted in bin 0.
    bins = tl.arange(0, NB)
    return hist - tl.where(bins == 0, n_blocks * BLOCK_V - in_prefix, 0)


@triton.jit
def _ckd_row_kernel(
    logits_ptr, stride_row, ids_ptr, tlp_ptr, stride_k, labels_ptr, scale_ptr, loss_ptr,
    V, K, topm, inv_t, lam, mix, ignore_index,
    HAS_LABELS: tl.constexpr, TAIL_BUCKET: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    LEVELS: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    NB: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    n_blocks = tl.cdiv(V, BLOCK_V)

    # Pass 1: logsumexp and the top-level histogram.
    run_max = -float("inf")
    run_sum = 0.0
    hist = tl.zeros((NB,), dtype=tl.int32)
    for i in range(0, n_blocks):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32) * inv_t
        new_max = tl.maximum(run_max, tl.max(x, 0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        run_max = new_max
        digit = tl.where(valid, _order_key(x) >> (32 - RADIX_BITS), 0).to(tl.int32)
        hist += tl.histogram(digit, NB)
    bins = tl.arange(0, NB)
    hist -= tl.where(bins == 0, n_blocks * BLOCK_V - V, 0)
    lse = run_max + tl.log(run_sum)

    # Radix select of the m-th largest key, one digit per level: thr ends as the
    # exact key, or the lower edge of a bin whose elements are all among the top m
    # (then no further level is needed). ``rank`` counts down within the bin.
    b, above, in_bin = _pick_bin(hist, topm, NB)
    prefix = b.to(tl.uint32)
    thr = prefix << (32 - RADIX_BITS)
    rank = topm - above
    for level in tl.static_range(1, LEVELS):
        if in_bin != rank:
            shift: tl.constexpr = 32 - RADIX_BITS * (level + 1)
            hist = _refine(row_ptr, V, inv_t, prefix, shift, in_bin, BLOCK_V, RADIX_BITS)
            b, above, in_bin = _pick_bin(hist, rank, NB)
            prefix = (prefix << RADIX_BITS) | b.to(tl.uint32)
            thr = thr | (b.to(tl.uint32) << shift)
            rank = rank - above

    # Pass 4: the student's confident mass.
    conf_mass = 0.0
    for i in range(0, n_blocks):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv_t
        hit = valid & (_order_key(x) >= thr)
        conf_mass += tl.sum(tl.where(hit, tl.exp(x - lse), 0.0), 0)

    # Teacher terms (K entries), gathered before the row is overwritten.
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    ids = tl.load(ids_ptr + row * stride_k + koffs, mask=kmask, other=0).to(tl.int64)
    tlp = tl.load(tlp_ptr + row * stride_k + koffs, mask=kmask, other=-float("inf")).to(tl.float32)
    ranked = kmask & (tlp > -float("inf"))
    p = tl.where(ranked, tl.exp(tlp), 0.0)
    x_s = tl.load(row_ptr + ids, mask=ranked, other=0.0).to(tl.float32) * inv_t
    logq_s = x_s - lse
    q_s = tl.where(ranked, tl.exp(logq_s), 0.0)
    s_conf = ranked & (_order_key(x_s) >= thr)
    fkl = tl.sum(p * (tl.where(ranked, tlp, 0.0) - logq_s), 0)
    mistake = conf_mass - tl.sum(tl.where(s_conf, q_s, 0.0), 0)
    teacher_mass = tl.sum(p, 0)
    student_mass = tl.sum(q_s, 0)
    loss = fkl + lam * mistake
    tail_ratio = 0.0
    if TAIL_BUCKET:
        p_tail = tl.maximum(1.0 - teacher_mass, 0.0)
        q_tail = tl.maximum(1.0 - student_mass, 1.1754943508222875e-38)
        safe_p = tl.where(p_tail > 0, p_tail, 1.0)
        loss += tl.where(p_tail > 0, p_tail * (tl.log(safe_p) - tl.log(q_tail)), 0.0)
        tail_ratio = p_tail / q_tail
    keep = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        keep = tl.where(label != ignore_index, 1.0, 0.0)
        label = tl.where(label != ignore_index, label, 0)
        x_label = tl.load(row_ptr + label).to(tl.float32) * inv_t
        loss = mix * loss + (1.0 - mix) * keep * (lse - x_label)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        s = tl.load(scale_ptr + row).to(tl.float32) * inv_t
        dense = (mix * (teacher_mass - lam * mistake - tail_ratio * student_mass)
                 + (1.0 - mix) * keep) * s
        confident_extra = mix * lam * s
        for i in range(0, n_blocks):
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv_t
            coef = tl.where(_order_key(x) >= thr, dense + confident_extra, dense)
            g = tl.exp(x - lse) * coef
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=valid)
        tl.debug_barrier()
        # Ranked ids are unique (validated), so these read-modify-writes don't collide.
        patch = mix * (tail_ratio * q_s - p - lam * tl.where(s_conf, q_s, 0.0)) * s
        g_s = tl.load(row_ptr + ids, mask=ranked, other=0.0).to(tl.float32)
        tl.store(row_ptr + ids, (g_s + patch).to(logits_ptr.dtype.element_ty), mask=ranked)
        if HAS_LABELS:
            tl.debug_barrier()
            g_l = tl.load(row_ptr + label).to(tl.float32)
            g_l -= (1.0 - mix) * keep * s
            tl.store(row_ptr + label, g_l.to(logits_ptr.dtype.element_ty))


def ckd_workspace_bytes(dtype: torch.dtype) -> int:
    """The chunk of logits is the only per-logit workspace (gradient written over it)."""
    return torch.empty((), dtype=dtype).element_size()


def ckd_rows(logits, teacher_ids, teacher_logprobs, labels, grad_scale, *, cfg: CKDConfig):
    """Triton implementation of the CKD row-op contract (see ``_chunked``)."""
    rows, vocab = logits.shape
    k = teacher_ids.shape[1]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return (loss,), (logits if grad_scale is not None else None)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids = teacher_ids.contiguous()
    tlp = teacher_logprobs.contiguous()
    has_labels = labels is not None and cfg.kd_ratio < 1.0
    compute_grad = grad_scale is not None
    _ckd_row_kernel[(rows,)](
        logits, logits.stride(0), ids, tlp, k,
        labels if has_labels else ids, grad_scale if compute_grad else loss, loss,
        vocab, k, cfg.student_topm, 1.0 / cfg.temperature, cfg.tail_coef, cfg.kd_ratio,
        cfg.ignore_index,
        HAS_LABELS=has_labels, TAIL_BUCKET=cfg.tail_bucket, COMPUTE_GRAD=compute_grad,
        # 16-bit floats widened to fp32 have zero key bits below bit 16 (bf16) or
        # 13 (fp16): the top 16 bits already give the exact value (unless a
        # temperature rescales them).
        LEVELS=(16 if logits.element_size() == 2 and cfg.temperature == 1.0 else 32) // RADIX_BITS,
        RADIX_BITS=RADIX_BITS, BLOCK_V=min(2048, triton.next_power_of_2(vocab)),
        BLOCK_K=triton.next_power_of_2(k),
    )
    return (loss,), (logits if compute_grad else None)
