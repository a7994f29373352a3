"""Triton row op for the CKD loss: one program per row of a logits chunk.

The row of logits is read in its own dtype and the gradient written back over it, so
the chunk is the only workspace. Per row:

1. pass 1: online logsumexp, fused with a 256-bin histogram of the top 8 bits of
   each logit's order-preserving integer key;
2. radix select of the m-th largest key, 8 key bits per level: each refine pass
   histograms the next digit over the elements still tied with the threshold's
   known prefix, and sums the student mass ``q_v`` of the elements above that
   prefix (all of them among the top m). A level is skipped once the chosen bin's
   count lands on m (the whole bin is in the top m);
3. the confident mass ``sum q_v`` over keys >= threshold comes out of the last
   level without a pass of its own: at the last level every histogram bin holds a
   single exact value, so its mass is ``count * exp(value - lse)``. Only a select
   that stopped early, above the last level, needs a separate mass pass;
4. |M| = m exactly: when the select reached the last level and more ids tie at the
   m-th value than M has room for, one more pass counts the ties per block to find
   the block of the ``rank``-th tied id, then a bisection over that one block finds
   the id; ties are admitted lowest ids first; the confident mass counts ``rank``
   copies of the threshold value;
5. the gradient pass overwrites the row (read-modify-write of each element), then
   the teacher ids and the label are patched after barriers.

Keys: 16-bit logits (bf16, fp16) use the 16-bit key of the stored value, two levels,
at any temperature (``x / T`` is monotone and, with fp32 arithmetic, keeps distinct
16-bit values distinct). fp32 logits use the 32-bit key of ``x / T``, four levels.

Full passes over the row (reads; the gradient pass also writes it), per variant:

=====================  ===========  ====================  =====================
logits                 select       with gradient         without gradient
=====================  ===========  ====================  =====================
bf16 / fp16, any T     2 passes     3                     2
fp32, any T            2-4 passes   3-5 (5 at most)       2-4
=====================  ===========  ====================  =====================

(fp32: ``1 + levels refined + (1 if the select stopped above the last level)``,
at most 4, plus the gradient pass. A row whose ties at the m-th value are cut reads
the row once more, in every variant: common in bf16, rare in fp32. The previous version always added a separate
confident-mass pass: 5 reads for 16-bit logits, up to 6 in fp32 or at T != 1.)
``tests/test_triton_ckd_passes.py`` counts the bytes the interpreter loads from the
chunk and checks this table. The teacher ids and the label are gathered from the
row (K + 1 elements), not counted as passes.

This finds the m-th largest logit without sorting or ``torch.topk`` over the row.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ._config import CKDConfig

# 8-bit digits: a 256-bin histogram per pass is cheap on GPUs (tl.histogram's cost
# grows with the bin count); 16-bit keys need two levels, fp32 keys four.
RADIX_BITS = 8

# tl.histogram takes a mask from triton 3.3 on; 3.2 (torch 2.6's) does not.
HIST_MASK = "mask" in inspect.signature(tl.histogram).parameters

# 2048 logits per step over 8 warps: 64 registers a thread on sm_90 and no spills
# (4 warps spilled 8 bytes), 4 programs (32 warps) per SM.
BLOCK_V = 2048
NUM_WARPS = 8

KD_TYPES = ("fkl", "rkl", "akl")  # the kernel's KD_TYPE codes 0, 1, 2


@triton.jit
def _order_key(x):
    """uint32 key whose unsigned order is the float order of ``x`` (fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # all ones for negatives, sign bit otherwise
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _order_key16(raw):
    """Key in [0, 2**16) whose order is the float order of 16-bit floats ``raw``."""
    bits = raw.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
    flip = (bits >> 15) | 0x8000
    return ((bits ^ flip) & 0xFFFF).to(tl.uint32)


@triton.jit
def _load_keys(row_ptr, offs, valid, inv_t, KEY16: tl.constexpr):
    """The row's values ``x / T`` in fp32 at ``offs`` (-inf where not valid) and their keys."""
    raw = tl.load(row_ptr + offs, mask=valid, other=-float("inf"))
    x = raw.to(tl.float32) * inv_t
    if KEY16:
        key = _order_key16(raw)
    else:
        key = _order_key(x)
    return x, key


@triton.jit
def _key_value(key, inv_t, dtype: tl.constexpr, KEY16: tl.constexpr):
    """Inverse of the key: the value ``x / T`` (fp32) whose key is ``key``."""
    positive = (key >> (15 if KEY16 else 31)) == 1
    if KEY16:
        bits = tl.where(positive, key & 0x7FFF, ~key & 0xFFFF).to(tl.int16)
        x = bits.to(dtype, bitcast=True).to(tl.float32) * inv_t
    else:
        bits = tl.where(positive, key & 0x7FFFFFFF, ~key)
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _histogram(digit, keep, NB: tl.constexpr, HIST_MASK: tl.constexpr):
    """Histogram of ``digit`` over the elements where ``keep`` holds."""
    if HIST_MASK:
        hist = tl.histogram(digit, NB, mask=keep)
    else:
        # triton 3.2 has no mask. Its lowering counts with per-warp ballots and adds
        # one value per bin and warp to shared memory, so a crowded bin 0 costs
        # nothing extra: the dropped elements are counted there and taken out.
        hist = tl.histogram(tl.where(keep, digit, 0), NB)
        dropped = tl.sum(tl.where(keep, 0, 1), 0)
        hist -= tl.where(tl.arange(0, NB) == 0, dropped, 0)
    return hist


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
def _refine(row_ptr, V, inv_t, lse, prefix, SHIFT: tl.constexpr, KEY16: tl.constexpr,
            HIST_MASK: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """One radix level over the row: the histogram of the digit at ``SHIFT`` over the
    elements whose higher key bits equal ``prefix``, and the mass ``sum q_v`` of the
    elements whose higher key bits are greater (all of them in the top m)."""
    NB: tl.constexpr = 1 << RADIX_BITS
    hist = tl.zeros((NB,), dtype=tl.int32)
    mass = 0.0
    for i in range(tl.cdiv(V, BLOCK_V)):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
        high = key >> (SHIFT + RADIX_BITS)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        hist += _histogram(digit, valid & (high == prefix), NB, HIST_MASK)
        mass += tl.sum(tl.where(valid & (high > prefix), tl.exp(x - lse), 0.0), 0)
    return hist, mass


@triton.jit
def _ckd_row_kernel(
    logits_ptr, stride_row, ids_ptr, tlp_ptr, stride_k, labels_ptr, scale_ptr, loss_ptr,
    V, K, topm, inv_t, lam, mix, ignore_index,
    HAS_LABELS: tl.constexpr, TAIL_BUCKET: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    KD_TYPE: tl.constexpr, KEY16: tl.constexpr, HIST_MASK: tl.constexpr, RADIX_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    NB: tl.constexpr = 1 << RADIX_BITS
    KEY_BITS: tl.constexpr = 16 if KEY16 else 32
    LEVELS: tl.constexpr = KEY_BITS // RADIX_BITS
    dtype = logits_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    n_blocks = tl.cdiv(V, BLOCK_V)

    # ---- Read phase: every load of the row's logits happens in this phase. ----
    # Teacher ids and the label first (gathers of K + 1 logits).
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    ids = tl.load(ids_ptr + row * stride_k + koffs, mask=kmask, other=0).to(tl.int64)
    tlp = tl.load(tlp_ptr + row * stride_k + koffs, mask=kmask, other=-float("inf")).to(tl.float32)
    ranked = kmask & (tlp > -float("inf"))
    x_s, key_s = _load_keys(row_ptr, ids, ranked, inv_t, KEY16)
    keep = 0.0
    x_label = 0.0
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        keep = tl.where(label != ignore_index, 1.0, 0.0)
        label = tl.where(label != ignore_index, label, 0)
        x_label = tl.load(row_ptr + label).to(tl.float32) * inv_t

    # Pass 1: logsumexp and the top-digit histogram.
    run_max = -float("inf")
    run_sum = 0.0
    hist = tl.zeros((NB,), dtype=tl.int32)
    for i in range(n_blocks):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        valid = offs < V
        x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
        new_max = tl.maximum(run_max, tl.max(x, 0))
        # While every logit so far is -inf (masked vocabulary), shift by 0, not -inf.
        shift_by = tl.where(new_max > -float("inf"), new_max, 0.0)
        run_sum = run_sum * tl.exp(run_max - shift_by) + tl.sum(tl.exp(x - shift_by), 0)
        run_max = new_max
        digit = (key >> (KEY_BITS - RADIX_BITS)).to(tl.int32)
        hist += _histogram(digit, valid, NB, HIST_MASK)
    lse = run_max + tl.log(run_sum)

    # Radix select of the m-th largest key, one digit per level. ``prefix`` holds the
    # digits chosen so far, ``rank`` counts down within the chosen bin, ``mass_above``
    # is the mass of the elements above the prefix, from the latest refine pass.
    b, above, in_bin = _pick_bin(hist, topm, NB)
    prefix = b.to(tl.uint32)
    rank = topm - above
    levels_done = 1
    mass_above = 0.0
    for level in tl.static_range(1, LEVELS):
        if in_bin != rank:
            shift: tl.constexpr = KEY_BITS - RADIX_BITS * (level + 1)
            hist, mass_above = _refine(row_ptr, V, inv_t, lse, prefix, shift, KEY16,
                                       HIST_MASK, BLOCK_V, RADIX_BITS)
            b, above, in_bin = _pick_bin(hist, rank, NB)
            prefix = (prefix << RADIX_BITS) | b.to(tl.uint32)
            rank = rank - above
            levels_done = level + 1
    # thr: the exact key of the m-th largest logit, or the lower edge of a bin whose
    # elements are all among the top m.
    thr = prefix << (KEY_BITS - RADIX_BITS * levels_done)
    # |M| = m exactly: an id is in M when its key is above thr, or equal to it and the
    # id is at most tie_cut. All of a bin that the select stopped on is in M; at the
    # last level, ``rank`` of the ``in_bin`` ids tied at thr are, the lowest ids first:
    # one more pass over the row finds the rank-th tied id (only when ties are cut).
    tie_cut = V
    if levels_done == LEVELS:
        if in_bin != rank:
            # Which block holds the rank-th tied id, and its rank there (scalar sums,
            # no scan), then a bisection on the id within that one block.
            seen = 0
            found = -1
            rank_in = 0
            for i in range(n_blocks):
                offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
                valid = offs < V
                x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
                n_tie = tl.sum((valid & (key == thr)).to(tl.int32), 0)
                hit = (found < 0) & (seen + n_tie >= rank)
                found = tl.where(hit, i, found)
                rank_in = tl.where(hit, rank - seen, rank_in)
                seen += n_tie
            offs = found * BLOCK_V + tl.arange(0, BLOCK_V)
            valid = offs < V
            x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
            tie = valid & (key == thr)
            lo = found * BLOCK_V
            hi = found * BLOCK_V + BLOCK_V - 1
            for _ in tl.static_range(11):  # log2 of the largest BLOCK_V, 2048
                mid = (lo + hi) // 2
                enough = tl.sum((tie & (offs <= mid)).to(tl.int32), 0) >= rank_in
                hi = tl.where(enough, mid, hi)
                lo = tl.where(enough, lo, mid + 1)
            tie_cut = lo

    # The confident mass sum_{key >= thr} q_v.
    if levels_done == LEVELS:
        # Last level: bin d holds only the value with key (prefix's upper digits, d).
        bins = tl.arange(0, NB)
        keys = ((prefix >> RADIX_BITS) << RADIX_BITS) | bins.to(tl.uint32)
        vals = _key_value(keys, inv_t, dtype, KEY16)
        count = tl.where(bins == b, rank, hist)  # the admitted ties at thr
        take = (bins >= b) & (count > 0)
        conf_mass = mass_above + tl.sum(
            tl.where(take, count.to(tl.float32) * tl.exp(vals - lse), 0.0), 0)
    else:
        # The select stopped above the last level: one mass pass.
        conf_mass = 0.0
        for i in range(n_blocks):
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            valid = offs < V
            x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
            conf_mass += tl.sum(tl.where(valid & (key >= thr), tl.exp(x - lse), 0.0), 0)

    # Teacher terms from the gathered logits.
    p = tl.where(ranked, tl.exp(tlp), 0.0)
    logq_s = x_s - lse
    q_s = tl.where(ranked, tl.exp(logq_s), 0.0)
    s_conf = ranked & ((key_s > thr) | ((key_s == thr) & (ids <= tie_cut)))
    safe_lp = tl.where(ranked, tlp, 0.0)
    safe_lq = tl.where(ranked, logq_s, 0.0)
    fkl = tl.sum(p * (safe_lp - safe_lq), 0)
    # The divergence over the teacher entries and its derivative g_div in each
    # entry's log q_j (see _torch_rows.kd_divergence): 0 fkl, 1 rkl, 2 akl.
    if KD_TYPE == 0:
        div = fkl
        g_div = -p
    else:
        r_terms = q_s * (safe_lq - safe_lp)
        rkl = tl.sum(r_terms, 0)
        d_rkl = r_terms + q_s
        if KD_TYPE == 1:
            div = rkl
            g_div = d_rkl
        else:
            head = ((tl.cumsum(p, 0) - p) < 0.5) | (koffs == 0)
            diff = p - q_s
            margin = tl.abs(diff)
            g_head = tl.sum(tl.where(head, margin, 0.0), 0)
            g_tail = tl.sum(tl.where(head, 0.0, margin), 0)
            total = g_head + g_tail
            total = tl.where(total != 0.0, total, 1e-9)
            div = (g_head * fkl + g_tail * rkl) / total
            sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
            w_entry = tl.where(head, fkl, rkl) - div
            g_div = (g_tail * d_rkl - g_head * p - sign * q_s * w_entry) / total
    mistake = conf_mass - tl.sum(tl.where(s_conf, q_s, 0.0), 0)
    teacher_mass = tl.sum(p, 0)
    student_mass = tl.sum(q_s, 0)
    loss = div + lam * mistake
    tail_ratio = 0.0
    if TAIL_BUCKET:
        p_tail = tl.maximum(1.0 - teacher_mass, 0.0)
        q_tail = tl.maximum(1.0 - student_mass, 1.1754943508222875e-38)
        safe_p = tl.where(p_tail > 0, p_tail, 1.0)
        loss += tl.where(p_tail > 0, p_tail * (tl.log(safe_p) - tl.log(q_tail)), 0.0)
        tail_ratio = p_tail / q_tail
    if HAS_LABELS:
        loss = mix * loss + (1.0 - mix) * keep * (lse - x_label)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # ---- Write phase. ---- Warps run ahead of each other between barriers: a
        # warp that reached the gradient loop could overwrite a logit that a slower
        # warp still has to read (this is how the label's logit, once loaded here,
        # could read a gradient value). Every read of the row's logits is above; the
        # barrier makes them complete in all warps before any warp writes.
        tl.debug_barrier()
        s = tl.load(scale_ptr + row).to(tl.float32) * inv_t
        dense = (mix * (-tl.sum(g_div, 0) - lam * mistake - tail_ratio * student_mass)
                 + (1.0 - mix) * keep) * s
        confident_extra = mix * lam * s
        for i in range(n_blocks):
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            valid = offs < V
            # Each thread reads then overwrites the same elements: no other warp's.
            x, key = _load_keys(row_ptr, offs, valid, inv_t, KEY16)
            in_m = (key > thr) | ((key == thr) & (offs <= tie_cut))
            coef = tl.where(in_m, dense + confident_extra, dense)
            g = tl.exp(x - lse) * coef
            tl.store(row_ptr + offs, g.to(dtype), mask=valid)
        tl.debug_barrier()
        # Ranked ids are unique (validated), so these writes don't collide; they come
        # after the gradient pass's writes (barrier). Each teacher id's whole gradient is
        # recomputed from its logit read above, not read back: a 16-bit dense part
        # rounded, then corrected by a patch of similar size, would keep that rounding.
        patch = mix * (tail_ratio * q_s + g_div - lam * tl.where(s_conf, q_s, 0.0)) * s
        g_s = q_s * tl.where(s_conf, dense + confident_extra, dense)  # q_s = exp(x_s - lse)
        tl.store(row_ptr + ids, (g_s + patch).to(dtype), mask=ranked)
        if HAS_LABELS:
            tl.debug_barrier()
            g_l = tl.load(row_ptr + label).to(tl.float32)
            g_l -= (1.0 - mix) * keep * s
            tl.store(row_ptr + label, g_l.to(dtype))


def ckd_workspace_bytes(dtype: torch.dtype) -> int:
    """The chunk of logits is the only per-logit workspace (gradient written over it)."""
    return torch.empty((), dtype=dtype).element_size()


def launch_config(logits: torch.Tensor, cfg: CKDConfig) -> dict:
    """Constexprs and launch options of :func:`_ckd_row_kernel` for these logits
    (everything but HAS_LABELS, TAIL_BUCKET, COMPUTE_GRAD, KD_TYPE and BLOCK_K)."""
    return {"KEY16": logits.element_size() == 2, "HIST_MASK": HIST_MASK,
            "RADIX_BITS": RADIX_BITS, "num_warps": NUM_WARPS,
            "BLOCK_V": min(BLOCK_V, triton.next_power_of_2(logits.shape[1]))}


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
        KD_TYPE=KD_TYPES.index(cfg.kd_type), BLOCK_K=triton.next_power_of_2(k), **launch_config(logits, cfg),
    )
    return (loss,), (logits if compute_grad else None)
