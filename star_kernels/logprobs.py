"""Fused linear per-token log-probs (and entropy): differentiable, no ``[N, V]`` logits.

``log q[id]`` with ``q = softmax((hidden @ weight.T + bias) / temperature)`` for
one given id per token, optionally with the entropy of ``q``. The forward pass
runs the chunk loop without gradients; the backward pass recomputes each chunk's
logits and turns the upstream per-token gradients into ``grad_hidden``,
``grad_weight`` and ``grad_bias`` (see :mod:`star_kernels._chunked`).
"""

from __future__ import annotations

import torch

from . import _backends, _validation as V
from ._chunked import rows_per_chunk, run_chunks


def _adapt(logprob_rows, temperature, want_entropy):
    """The backend row function in the chunk loop's row-op form.

    The chunk loop slices one ``grad_scale`` tensor per chunk; here it is
    ``[N, 2]`` (upstream gradients of log-prob and entropy) or ``[N, 1]``.
    """
    def row_op(logits, token_ids, scale):
        gl = ge = None
        if scale is not None:
            gl = scale[:, 0]
            ge = scale[:, 1] if scale.shape[1] > 1 else None
        logp, ent, dlogits = logprob_rows(logits, token_ids, temperature, want_entropy, gl, ge)
        return ((logp, ent) if want_entropy else (logp,)), dlogits
    return row_op


class _FusedLinearLogprobs(torch.autograd.Function):
    """Rows are flat ``[N, H]``; returns ``logp [N]`` or ``(logp [N], entropy [N])``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, want_entropy, backend,
                memory_budget):
        logprob_rows, workspace = _backends.row_functions(backend, "logprob")
        n = hidden.shape[0]
        chunk = rows_per_chunk(n, weight.shape[0], workspace(hidden.dtype), memory_budget)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        outs, *_ = run_chunks(hidden, weight, bias,
                              _adapt(logprob_rows, temperature, want_entropy),
                              (token_ids,), None, chunk)
        ctx.row_fn, ctx.chunk = logprob_rows, chunk
        ctx.temperature, ctx.want_entropy = temperature, want_entropy
        ctx.bias_given = bias is not None
        ctx.save_for_backward(hidden, weight, bias, token_ids)
        outs = tuple(o.to(out_dtype) for o in outs)
        return outs if want_entropy else outs[0]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, token_ids = ctx.saved_tensors
        needs = ctx.needs_input_grad
        ctype = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        gl = torch.zeros(n, dtype=ctype, device=hidden.device) if grad_logp is None \
            else grad_logp.to(ctype)
        cols = [gl]
        if ctx.want_entropy and grad_entropy is not None:
            cols.append(grad_entropy.to(ctype))
        scale = torch.stack(cols, 1)
        _, gh, gw, gb = run_chunks(
            hidden, weight, bias, _adapt(ctx.row_fn, ctx.temperature, ctx.want_entropy),
            (token_ids,), scale, ctx.chunk,
            need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
        return gh, gw, gb if ctx.bias_given else None, None, None, None, None, None


def check_logprob_args(hidden, weight, token_ids, bias, temperature, memory_budget,
                       name="token_ids"):
    """Shared input checks of the log-prob ops (GRPO reuses them)."""
    V.check_linear(hidden, weight, bias)
    V.check_token_tensor(name, token_ids, hidden.shape[:-1], hidden.device, V.INT_DTYPES)
    V.check_positive("temperature", temperature)
    if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")


def logprobs_rows(h, weight, bias, ids, temperature, want_entropy, backend, budget):
    """Autograd-aware log-probs of flat rows (inputs already checked and resolved)."""
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    return _FusedLinearLogprobs.apply(h, weight_c, bias, ids, float(temperature),
                                      bool(want_entropy), backend, budget)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    memory_budget: int | None = None,
):
    """Log-prob of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` (already aligned with ``token_ids``).
        weight: ``[V, H]``; ``bias``: optional ``[V]``.
        token_ids: ``[N]`` / ``[B, T]`` ids in ``[0, V)``.
        return_entropy: also return the entropy of the full distribution.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"``.
        memory_budget: bytes of transient chunk workspace.

    Returns ``logp`` (token shape, float32; float64 for float64 inputs) or
    ``(logp, entropy)``; both are differentiable in ``hidden``, ``weight`` and
    ``bias``.
    """
    check_logprob_args(hidden, weight, token_ids, bias, temperature, memory_budget)
    V.check_ids_in_vocab("token_ids", token_ids, weight.shape[0])
    backend = _backends.resolve(backend, hidden.device)
    budget = memory_budget or _backends.default_memory_budget(hidden.device)
    token_shape = hidden.shape[:-1]
    out = logprobs_rows(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                        token_ids.reshape(-1), temperature, return_entropy, backend, budget)
    if return_entropy:
        return out[0].reshape(token_shape), out[1].reshape(token_shape)
    return out.reshape(token_shape)
