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
"""

from __future__ import annotations

import torch


def rows_per_chunk(n_rows: int, vocab: int, bytes_per_logit: int, memory_budget: int) -> int:
    """How many rows fit a chunk whose logits and workspace stay within the budget."""
    rows = memory_budget // max(1, vocab * bytes_per_logit)
    return int(max(1, min(n_rows, rows)))


def _chunk_logits(h, weight, bias):
    if bias is None:
        return h @ weight.T
    return torch.addmm(bias, h, weight.T)


def run_chunks(hidden, weight, bias, row_op, row_inputs, grad_scale, chunk_rows,
               need_grad_hidden=True, need_grad_weight=True):
    """Run ``row_op`` over ``hidden`` in chunks; see the module docstring.

    Returns ``(outputs, grad_hidden, grad_weight, grad_bias)``. ``grad_weight``
    and ``grad_bias`` are accumulated in float32 (float64 for float64 weights); gradients are ``None`` when
    ``grad_scale`` is ``None`` or when not asked for.
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
            if dlogits.dtype == grad_weight.dtype:
                grad_weight.addmm_(dlogits.T, h)
            else:
                # One low-precision GEMM per chunk (fp32 accumulation inside it),
                # accumulated across chunks in fp32.
                grad_weight.add_(dlogits.T @ h)
            if grad_bias is not None:
                grad_bias.add_(dlogits.sum(0, dtype=grad_bias.dtype))
        del dlogits
    outputs = tuple(torch.cat(parts) for parts in zip(*outputs))
    return outputs, grad_hidden, grad_weight, grad_bias
