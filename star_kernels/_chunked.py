"""The chunk loop every fused op shares.

Rows of ``hidden`` are processed ``chunk_rows`` at a time: one ``[chunk, V]`` block
of logits is materialised, a backend's *row op* reduces it to per-row outputs and
(when gradients are wanted) overwrites it with d(loss)/d(logits), and two matrix
products turn that into the chunk's slice of ``grad_hidden`` and its contribution
to ``grad_weight``. Transient memory is one chunk of logits plus the row op's
workspace, never ``[N, V]``.

A row op has the signature ``row_op(logits, *row_inputs, grad_scale)`` and
returns ``(outputs, dlogits)``: ``outputs`` is a tuple of per-row tensors and
``dlogits`` (``None`` when ``grad_scale`` is ``None``) is d(sum_r grad_scale[r] *
loss[r]) / d(logits), in ``logits.dtype``, usually the same buffer.

Nothing here reads a tensor's value on the host: the loop has no host
synchronisation.
"""

from __future__ import annotations

import torch


def rows_per_chunk(n_rows: int, vocab: int, bytes_per_logit: int, memory_budget: int) -> int:
    """How many rows fit a chunk whose logits and workspace stay within the budget."""
    rows = memory_budget // max(1, vocab * bytes_per_logit)
    return int(max(1, min(n_rows, rows)))


def cast_operands(hidden, weight, bias, dtype):
    """``hidden``, ``weight``, ``bias`` in the compute dtype, ``weight`` contiguous.

    Called inside an autograd Function's forward, so autograd never sees these
    copies: gradients are returned for the originals, in their own dtypes.
    """
    def cast(t):
        return None if t is None else t.to(dtype)
    weight = cast(weight)
    return cast(hidden), (weight if weight.is_contiguous() else weight.contiguous()), cast(bias)


def _chunk_logits(h, weight, bias):
    if bias is None:
        return h @ weight.T
    return torch.addmm(bias, h, weight.T)


# Whether torch.addmm(acc_fp32, a_16bit, b_16bit, out_dtype=float32, out=acc) works on
# a device: cuBLAS accumulates 16-bit products in fp32 and can write fp32 (torch >= 2.8
# has the overload; early versions required ``acc`` in the inputs' dtype). Probed once.
_FP32_OUT_ADDMM: dict = {}


def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _FP32_OUT_ADDMM:
        if torch.cuda.is_current_stream_capturing():
            return False  # the probe reads a value back: not while a graph is captured
        try:
            a = torch.ones(2, 3, dtype=dtype, device=device)
            acc = torch.ones(2, 2, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
            ok = bool((acc == 4).all())  # once per process, never on the hot path
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_ADDMM[key] = ok
    return _FP32_OUT_ADDMM[key]


# Vocabulary rows per low-precision partial in the last-resort path: a bounded
# [block, H] temporary instead of a [V, H] one per chunk.
_PARTIAL_ROWS = 8192


def accumulate_weight_grad(acc, dlogits, h):
    """``acc += dlogits.T @ h`` with ``acc`` in fp32/fp64, never a ``[V, H]`` 16-bit partial.

    Same dtype: one in-place GEMM. 16-bit inputs on CUDA: an fp32-output GEMM
    straight into ``acc`` where torch has one. On CPU: the chunk is widened to
    ``acc``'s dtype first (the row op's float workspace is free again by now, and
    CPU 16-bit GEMMs are not faster than fp32 ones). Elsewhere: per vocabulary
    block, a small 16-bit product added to ``acc``.
    """
    if dlogits.dtype == acc.dtype:
        acc.addmm_(dlogits.T, h)
    elif acc.device.type == "cuda" and _fp32_out_addmm_works(acc.device, dlogits.dtype):
        torch.addmm(acc, dlogits.T, h, out_dtype=acc.dtype, out=acc)
    elif acc.device.type == "cpu":
        acc.addmm_(dlogits.T.to(acc.dtype), h.to(acc.dtype))
    else:
        _accumulate_blocked(acc, dlogits, h)


def _accumulate_blocked(acc, dlogits, h):
    """``acc += dlogits.T @ h`` through ``[_PARTIAL_ROWS, H]`` 16-bit partials (a GPU
    without an fp32-output GEMM in this torch: widening the chunk there would run the
    GEMM in fp32 without tensor cores)."""
    for start in range(0, acc.shape[0], _PARTIAL_ROWS):
        block = slice(start, start + _PARTIAL_ROWS)
        acc[block].add_(dlogits[:, block].T @ h)


def run_chunks(hidden, weight, bias, row_op, row_inputs, grad_scale, chunk_rows,
               need_grad_hidden=True, need_grad_weight=True):
    """Run ``row_op`` over ``hidden`` in chunks; see the module docstring.

    ``hidden``, ``weight`` and ``bias`` share one dtype (see :func:`cast_operands`).
    Returns ``(outputs, grad_hidden, grad_weight, grad_bias)``: ``grad_hidden`` in
    that dtype, ``grad_weight`` and ``grad_bias`` accumulated in float32 (float64
    for float64 weights); gradients are ``None`` when ``grad_scale`` is ``None``
    or when not asked for.
    """
    n = hidden.shape[0]
    with_grad = grad_scale is not None
    grad_hidden = torch.empty_like(hidden) if with_grad and need_grad_hidden else None
    grad_weight = grad_bias = None
    if with_grad and need_grad_weight:
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    outputs = []
    for start in range(0, max(n, 1), chunk_rows):  # an empty input still runs one empty chunk
        end = min(n, start + chunk_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        scale = grad_scale[start:end] if with_grad else None
        chunk_rows_in = (None if t is None else t[start:end] for t in row_inputs)
        out, dlogits = row_op(logits, *chunk_rows_in, scale)
        outputs.append(out)
        del logits  # dlogits may alias it; either way the next chunk must not overlap it
        if not with_grad:
            continue
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            accumulate_weight_grad(grad_weight, dlogits, h)
            if grad_bias is not None:
                grad_bias.add_(dlogits.sum(0, dtype=grad_bias.dtype))
        del dlogits
    outputs = tuple(torch.cat(parts) for parts in zip(*outputs))
    return outputs, grad_hidden, grad_weight, grad_bias


def finish_grad(grad, dtype, grad_out=None):
    """``grad * grad_out`` in ``dtype``, in one pass (``None`` passes through).

    In place when the dtypes agree (the saved gradient is not needed again);
    otherwise one elementwise kernel reads the fp32 accumulator and writes the
    input's dtype, instead of a scaling pass followed by a cast pass.
    """
    if grad is None:
        return None
    if grad_out is None:
        return grad if grad.dtype == dtype else grad.to(dtype)
    if grad.dtype == dtype:
        return grad.mul_(grad_out)
    return torch.mul(grad, grad_out, out=torch.empty(grad.shape, dtype=dtype,
                                                     device=grad.device))
