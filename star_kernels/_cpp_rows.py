"""Row ops of the C++ CPU backend ("cpp"): thin wrappers over ``star_kernels._C``.

``ckd_rows`` follows the row-op contract of :mod:`star_kernels._chunked` and has
the semantics of :func:`star_kernels._torch_rows.ckd_rows`. The kernels run in
float64 for float64 logits and float32 otherwise: a bfloat16/float16 chunk is
converted to a float32 copy and the gradient copied back. Inputs are validated
before any row op runs; these wrappers only convert dtypes and layouts.
"""

from __future__ import annotations

import os

import torch

from . import _C
from ._config import CKDConfig

# Student top-m selection: 0 = one min-heap scan of the row (default, faster),
# 1 = nth_element on a copy of the row. Kept selectable for benchmarking.
_SELECT_ALGO = int(os.environ.get("STAR_KERNELS_CPP_SELECT", "0"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _work_buffer(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` itself when the kernels can write it in place, else a float copy."""
    ctype = _compute_dtype(logits.dtype)
    if logits.dtype == ctype and logits.is_contiguous():
        return logits
    return logits.to(ctype).contiguous()


def _rows(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def ckd_workspace_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit: the chunk itself, plus a float32 copy for 16-bit logits.

    Per-thread scratch is O(V / 16 + m + K) elements per thread, not per logit.
    """
    item = torch.empty((), dtype=dtype).element_size()
    return item + (0 if dtype in (torch.float32, torch.float64) else 4)


topk_workspace_bytes = logprob_workspace_bytes = ckd_workspace_bytes


KD_TYPES = ("fkl", "rkl", "akl")  # the kernel's kd_type codes 0, 1, 2


def ckd_rows(logits, teacher_ids, teacher_logprobs, labels, grad_scale, *, cfg: CKDConfig):
    """Per-row CKD loss of a ``[C, V]`` logits chunk, and its gradient in place."""
    z = _work_buffer(logits)
    ctype = z.dtype
    lab = _rows(labels, torch.int64) if cfg.kd_ratio < 1.0 else None
    loss = _C.ckd_rows(
        z, _rows(teacher_ids, torch.int64), _rows(teacher_logprobs, ctype), lab,
        _rows(grad_scale, ctype), float(cfg.tail_coef), int(cfg.student_topm),
        float(cfg.kd_ratio), float(cfg.temperature), bool(cfg.tail_bucket),
        int(cfg.ignore_index), _SELECT_ALGO, KD_TYPES.index(cfg.kd_type))
    if grad_scale is None:
        return (loss,), None
    if z is not logits:
        logits.copy_(z)
    return (loss,), logits


def topk_rows(logits: torch.Tensor, k: int, temperature: float):
    """Exact top-``k`` of ``log_softmax(logits / temperature)`` per row, sorted descending.

    Returns ``(ids int64 [C, k], logprobs float32 [C, k])``; ties rank the smaller id
    first. ``logits`` is not modified. No gradient.
    """
    x = logits if logits.dtype == _compute_dtype(logits.dtype) and logits.is_contiguous() \
        else logits.to(_compute_dtype(logits.dtype)).contiguous()
    return _C.topk_rows(x, int(k), float(temperature))


def logprob_rows(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                 want_entropy: bool, grad_logp=None, grad_entropy=None):
    """Sampled-token log-probs (and entropy) of ``softmax(logits / temperature)`` per row.

    Returns ``(logp [C], entropy [C] or None, dlogits or None)`` in float32 (float64
    for float64 logits). With ``grad_logp`` given, ``logits`` is overwritten with
    d(sum_r grad_logp[r] * logp[r] + grad_entropy[r] * H[r]) / d(logits) and
    returned as ``dlogits`` (``grad_entropy=None`` means zero).
    """
    z = _work_buffer(logits)
    ctype = z.dtype
    with_grad = grad_logp is not None
    logp, entropy, dlogits = _C.logprob_rows(
        z, _rows(token_ids, torch.int64), float(temperature), bool(want_entropy),
        _rows(grad_logp, ctype), _rows(grad_entropy, ctype) if with_grad else None)
    if with_grad and z is not logits:
        logits.copy_(z)
        dlogits = logits
    return logp, entropy, dlogits
