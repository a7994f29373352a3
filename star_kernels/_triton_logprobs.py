"""Triton row op for per-token log-probs and entropy (backend ``"triton"``).

One program per row loops over the vocabulary in blocks: pass 1 keeps an online
logsumexp of ``u = logits / T`` together with the running ``sum exp(u - m) * u``
(so the entropy ``H = lse - E_q[u]`` needs no second pass); pass 2, only when
gradients are wanted, overwrites the row with
``(g_logp * (onehot - q) - g_ent * q * (log q + H)) / T``. Rows are computed in
float32 whatever the input dtype.
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
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)        # sum exp(u - m)
    t = tl.zeros((), tl.float32)        # sum exp(u - m) * u
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        u = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(u, 0))
        alpha = tl.exp(m - m_new)
        e = tl.where(inb, tl.exp(u - m_new), 0.0)
        s = s * alpha + tl.sum(e, 0)
        t = t * alpha + tl.sum(e * tl.where(inb, u, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    entropy = lse - t / s
    tok = tl.load(ids_ptr + row)
    u_tok = tl.load(base + tok).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, u_tok - lse)
    tl.store(ent_ptr + row, entropy)
    if WITH_GRAD:
        gl = tl.load(grad_logp_ptr + row).to(tl.float32) * inv_t
        if WITH_GRAD_ENT:
            ge = tl.load(grad_ent_ptr + row).to(tl.float32) * inv_t
        else:
            ge = 0.0
        for start in range(0, V, BLOCK):
            offs = start + cols
            inb = offs < V
            u = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_t
            logq = u - lse
            q = tl.exp(logq)
            g = -q * (gl + ge * (logq + entropy))
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
