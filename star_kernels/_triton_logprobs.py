"""Triton row op for per-token log-probs and entropy (backend ``"triton"``).

One program per row loops over the vocabulary in blocks: pass 1 keeps an online
logsumexp of ``u = logits / T`` together with the running ``sum exp(u - m) * u``
(so the entropy ``H = lse - E_q[u]`` needs no second pass); pass 2, only when
gradients are wanted, overwrites the row with
``(g_logp * (onehot - q) - g_ent * q * (log q + H)) / T``. Rows are computed in
float32 whatever the input dtype. Logits of -inf (a -inf bias on padded vocabulary)
have q = 0: they add nothing to the entropy and get a zero gradient.

The sampled token's logit is loaded before pass 1 and a barrier separates the read
passes from the write pass, so no warp overwrites a logit that another still reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logprob_kernel(logits_ptr, stride_row, ids_ptr, logp_ptr, ent_ptr,
                    grad_logp_ptr, grad_ent_ptr, V, inv_t,
                    WITH_GRAD: tl.constexpr, WITH_GRAD_ENT: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK)
    # ---- Read phase: every load of the row's logits happens in this phase. ----
    tok = tl.load(ids_ptr + row)
    u_tok = tl.load(base + tok).to(tl.float32) * inv_t
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)        # sum exp(u - m)
    t = tl.zeros((), tl.float32)        # sum exp(u - m) * u
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        u = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(u, 0))
        # While every logit so far is -inf (masked vocabulary), shift by 0, not -inf.
        shift_by = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - shift_by)
        e = tl.exp(u - shift_by)
        s = s * alpha + tl.sum(e, 0)
        # A -inf logit (e.g. a -inf bias on padded vocabulary) has q = 0 and adds
        # nothing to E_q[u]; 0 * -inf would be NaN.
        t = t * alpha + tl.sum(e * tl.where(e > 0, u, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    entropy = lse - t / s
    tl.store(logp_ptr + row, u_tok - lse)
    tl.store(ent_ptr + row, entropy)
    if WITH_GRAD:
        # ---- Write phase. ---- Without this barrier a warp that reached the loop
        # below could overwrite the token's logit before a slower warp loaded it
        # (the loads above are issued after pass 1's last cross-warp reduction).
        tl.debug_barrier()
        gl = tl.load(grad_logp_ptr + row).to(tl.float32) * inv_t
        if WITH_GRAD_ENT:
            ge = tl.load(grad_ent_ptr + row).to(tl.float32) * inv_t
        else:
            ge = 0.0
        for start in range(0, V, BLOCK):
            offs = start + cols
            inb = offs < V
            # Each thread reads then overwrites the same elements: no other warp's.
            u = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_t
            logq = u - lse
            q = tl.exp(logq)
            # q = 0 (a -inf logit): zero gradient, not 0 * -inf.
            g = -q * (gl + ge * (tl.where(q > 0, logq, 0.0) + entropy))
            g = tl.where(offs == tok, g + gl, g)
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=inb)


def logprob_workspace_bytes(dtype: torch.dtype) -> int:
    """The kernel works in registers: only the chunk of logits itself."""
    return torch.empty((), dtype=dtype).element_size()


def _block(vocab: int) -> int:
    return min(4096, triton.next_power_of_2(max(vocab, 16)))


def logprob_rows(logits, token_ids, temperature: float, want_entropy: bool,
                 grad_logp=None, grad_entropy=None):
    """Same contract as :func:`star_kernels._torch_rows.logprob_rows`."""
    c, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    dev = logits.device
    logp = torch.empty(c, dtype=torch.float32, device=dev)
    ent = torch.empty(c, dtype=torch.float32, device=dev)
    with_grad = grad_logp is not None or grad_entropy is not None
    if with_grad and grad_logp is None:
        grad_logp = torch.zeros(c, dtype=torch.float32, device=dev)
    if grad_logp is not None:
        grad_logp = grad_logp.contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.contiguous()
    if c:
        ids = token_ids if token_ids.dtype == torch.int64 else token_ids.long()
        _logprob_kernel[(c,)](
            logits, logits.stride(0), ids.contiguous(), logp, ent,
            grad_logp if with_grad else logp, grad_entropy if grad_entropy is not None else logp,
            vocab, 1.0 / temperature,
            WITH_GRAD=with_grad, WITH_GRAD_ENT=grad_entropy is not None,
            BLOCK=_block(vocab))
    return logp, (ent if want_entropy else None), (logits if with_grad else None)
