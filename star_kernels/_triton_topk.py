"""Triton row op for top-k log-probs (backend ``"triton"``).

One program per row, a few passes over the vocabulary in blocks, no
``[C, V]`` workspace:

1. online logsumexp of ``u = logits / T`` and a 256-bin histogram of the top
   8 bits of each value's order-preserving integer key;
2. three more histogram passes, each over the values whose key matches the
   bits chosen so far, refine the key of the k-th largest value 8 bits at a
   time (a radix select: the exact threshold after 4 passes);
3. a gather pass writes the ids above the threshold, then as many ids equal to
   it as still fit (lowest ids first), with their log-probs ``u - lse``.

The ``k`` winners are then sorted on the device by ``torch.sort`` (a ``[C, k]``
sort, cheap next to the row passes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_ckd import HIST_MASK, _histogram

# 2048 logits per step over 16 warps: 58 registers a thread on sm_90 with the launch
# signature the library uses, 2 programs (32 warps) per SM, as the CKD kernel's 4
# programs of 8 warps. 2048 over 4 warps needed 168 registers (12 warps per SM), over
# 8 warps 105 (16). tests/test_triton_compile.py checks the occupancy.
BLOCK = 2048
NUM_WARPS = 16


@triton.jit
def _key(u):
    """int32 whose signed order is the float order of ``u`` (fp32)."""
    bits = u.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _digit(key, SHIFT: tl.constexpr):
    """8-bit digit of the key at ``SHIFT``, in unsigned order (sign bit flipped at the top)."""
    d = (key >> SHIFT) & 0xFF
    if SHIFT == 24:
        d = d ^ 0x80
    return d


@triton.jit
def _select_digit(hist, k_rem, bins):
    """Digit holding the ``k_rem``-th largest entry, and how many entries lie above it."""
    total = tl.sum(hist, 0)
    at_or_above = total - tl.cumsum(hist, 0) + hist      # count with digit >= d
    digit = tl.sum((at_or_above >= k_rem).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
    return digit, above


@triton.jit
def _refine(base, V, inv_t, prefix, k_rem, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
            HIST_MASK: tl.constexpr):
    """One radix pass over the entries whose key agrees with ``prefix`` above ``SHIFT + 8``."""
    cols = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    hist = tl.zeros((256,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        u = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_t
        key = _key(u)
        ok = inb & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        hist += _histogram(_digit(key, SHIFT), ok, 256, HIST_MASK)
    digit, above = _select_digit(hist, k_rem, bins)
    return prefix | (digit << SHIFT), k_rem - above


@triton.jit
def _topk_kernel(logits_ptr, stride_row, out_ids_ptr, out_lp_ptr, V, K, inv_t,
                 BLOCK: tl.constexpr, HIST_MASK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    # Pass 1: logsumexp and the histogram of the top digit.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    hist = tl.zeros((256,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        u = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(u, 0))
        # While every logit so far is -inf (masked vocabulary), shift by 0, not -inf.
        shift_by = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - shift_by) + tl.sum(tl.where(inb, tl.exp(u - shift_by), 0.0), 0)
        m = m_new
        hist += _histogram(_digit(_key(u), 24), inb, 256, HIST_MASK)
    lse = m + tl.log(s)
    digit, above = _select_digit(hist, K, bins)
    prefix = (digit ^ 0x80) << 24
    k_rem = K - above

    # Passes 2-4: the remaining 24 bits of the threshold key.
    prefix, k_rem = _refine(base, V, inv_t, prefix, k_rem, 16, BLOCK, HIST_MASK)
    prefix, k_rem = _refine(base, V, inv_t, prefix, k_rem, 8, BLOCK, HIST_MASK)
    prefix, k_rem = _refine(base, V, inv_t, prefix, k_rem, 0, BLOCK, HIST_MASK)
    n_above = K - k_rem                                   # entries strictly above it

    # Gather: entries above the threshold, then ties at it until K are taken.
    out_ids = out_ids_ptr + row.to(tl.int64) * K
    out_lp = out_lp_ptr + row.to(tl.int64) * K
    n_gt = 0
    n_eq = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        u = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_t
        key = _key(u)
        gt = inb & (key > prefix)
        eq = inb & (key == prefix)
        # One scan counts both: ``gt`` in the low 16 bits, ``eq`` in the high ones
        # (BLOCK < 2**16), half the registers and shuffles of two scans.
        both = tl.cumsum(gt.to(tl.int32) | (eq.to(tl.int32) << 16), 0)
        pos = tl.where(gt, n_gt + (both & 0xFFFF) - 1, n_above + n_eq + (both >> 16) - 1)
        keep = gt | (eq & (pos < K))
        tl.store(out_ids + pos, offs.to(tl.int64), mask=keep)
        tl.store(out_lp + pos, u - lse, mask=keep)
        total = tl.sum(gt.to(tl.int32) | (eq.to(tl.int32) << 16), 0)
        n_gt += total & 0xFFFF
        n_eq += total >> 16


def topk_workspace_bytes(dtype: torch.dtype) -> int:
    """The kernel works in registers: only the chunk of logits itself."""
    return torch.empty((), dtype=dtype).element_size()


def launch_config(logits: torch.Tensor) -> dict:
    """Constexprs and launch options of :func:`_topk_kernel` for these logits."""
    return {"BLOCK": min(BLOCK, triton.next_power_of_2(max(logits.shape[1], 16))),
            "HIST_MASK": HIST_MASK, "num_warps": NUM_WARPS}


def topk_rows(logits, k: int, temperature: float):
    """Same contract as :func:`star_kernels._torch_rows.topk_rows`."""
    c, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    ids = torch.empty(c, k, dtype=torch.int64, device=logits.device)
    lps = torch.empty(c, k, dtype=torch.float32, device=logits.device)
    if c:
        _topk_kernel[(c,)](logits, logits.stride(0), ids, lps, vocab, k, 1.0 / temperature,
                           **launch_config(logits))
    # Winners arrive in ascending id order; a stable sort keeps it among ties.
    lps, order = lps.sort(dim=1, descending=True, stable=True)
    return ids.gather(1, order), lps
