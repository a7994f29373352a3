"""Fused linear per-token log-probs (and entropy): differentiable, no ``[N, V]`` logits.

``log q[id]`` with ``q = softmax((hidden @ weight.T + bias) / temperature)`` for
one given id per token, optionally with the entropy of ``q``. The forward pass
runs the chunk loop without gradients; the backward pass recomputes each chunk's
logits and turns the upstream per-token gradients into ``grad_hidden``,
``grad_weight`` and ``grad_bias`` (see :mod:`star_kernels._chunked`).
"""

from __future__ import annotations

import torch

from . import _backends
from . import _validation as V
from ._chunked import cast_operands, finish_grad, rows_per_chunk, run_chunks
from ._config import LogprobOptions, RunOptions


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


class _LogprobsFunction(torch.autograd.Function):
    """Rows are flat ``[N, H]``; returns ``logp [N]`` or ``(logp [N], entropy [N])``.

    Inputs come in their own dtypes and are cast to the compute dtype here, so
    each one's gradient comes back in its own dtype (see :mod:`star_kernels.ckd`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, opts: LogprobOptions):
        run = opts.run
        ctx.opts = opts
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        with _backends.no_autocast(hidden.device):
            h, w, b = cast_operands(hidden, weight, bias, run.compute_dtype)
            logprob_rows, workspace = _backends.row_functions(run.backend, "logprob")
            chunk = rows_per_chunk(h.shape[0], w.shape[0], workspace(h.dtype), run.memory_budget)
            out_dtype = torch.promote_types(h.dtype, torch.float32)
            outs, *_ = run_chunks(h, w, b,
                                  _adapt(logprob_rows, opts.temperature, opts.want_entropy),
                                  (token_ids,), None, chunk)
        ctx.row_fn, ctx.chunk = logprob_rows, chunk
        ctx.save_for_backward(h, w, b, token_ids)
        outs = tuple(o.to(out_dtype) for o in outs)
        return outs if opts.want_entropy else outs[0]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, w, b, token_ids = ctx.saved_tensors
        opts, needs = ctx.opts, ctx.needs_input_grad
        ctype = torch.promote_types(h.dtype, torch.float32)
        n = h.shape[0]
        gl = torch.zeros(n, dtype=ctype, device=h.device) if grad_logp is None \
            else grad_logp.to(ctype)
        cols = [gl]
        if opts.want_entropy and grad_entropy is not None:
            cols.append(grad_entropy.to(ctype))
        scale = torch.stack(cols, 1)
        with _backends.no_autocast(h.device):
            _, gh, gw, gb = run_chunks(
                h, w, b, _adapt(ctx.row_fn, opts.temperature, opts.want_entropy),
                (token_ids,), scale, ctx.chunk,
                need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
            grads = [finish_grad(g, dtype) if need else None
                     for g, dtype, need in zip((gh, gw, gb), ctx.dtypes, needs)]
        return (*grads, None, None)


def check_logprob_args(hidden, weight, token_ids, bias, temperature, memory_budget,
                       name="token_ids"):
    """Shared structure checks of the log-prob ops (GRPO reuses them)."""
    V.check_linear(hidden, weight, bias)
    V.check_token_tensor(name, token_ids, hidden.shape[:-1], hidden.device, V.INT_DTYPES)
    V.check_positive("temperature", temperature)
    V.check_memory_budget(memory_budget)


def run_options(hidden, weight, bias, backend, memory_budget) -> RunOptions:
    """Concrete backend, budget and compute dtype of a call (inputs already checked)."""
    return RunOptions(_backends.resolve(backend, hidden.device),
                      memory_budget or _backends.default_memory_budget(hidden.device),
                      _backends.compute_dtype(hidden, weight, bias))


def logprobs_rows(h, weight, bias, ids, temperature, want_entropy, run: RunOptions):
    """Autograd-aware log-probs of flat rows (inputs already checked and resolved)."""
    opts = LogprobOptions(run, float(temperature), bool(want_entropy))
    return _LogprobsFunction.apply(h, weight, bias, ids, opts)


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
    validate: str = "auto",
):
    """Log-prob of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` (already aligned with ``token_ids``).
        weight: ``[V, H]``; ``bias``: optional ``[V]``. Under ``torch.autocast``
            the GEMMs run in the autocast dtype; mixed dtypes outside it run in
            the lower precision. Gradients come back in each input's own dtype.
        token_ids: ``[N]`` / ``[B, T]`` ids in ``[0, V)``.
        return_entropy: also return the entropy of the full distribution.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"``.
        memory_budget: bytes of transient chunk workspace.
        validate: when ``token_ids`` are checked to lie in the vocabulary
            (``"auto"``: every call on CPU, the first call on CUDA; ``"full"``;
            ``"shapes"``: never), as for :func:`fused_linear_ckd_loss`.

    Returns ``logp`` (token shape, float32; float64 for float64 inputs) or
    ``(logp, entropy)``; both are differentiable in ``hidden``, ``weight`` and
    ``bias``.
    """
    check_logprob_args(hidden, weight, token_ids, bias, temperature, memory_budget)
    checks = V.value_checks(validate, "logprobs", hidden.device)
    run = run_options(hidden, weight, bias, backend, memory_budget)
    if checks is not None:
        V.check_ids_in_vocab(checks, "token_ids", token_ids, weight.shape[0])
        checks.run()
    token_shape = hidden.shape[:-1]
    out = logprobs_rows(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                        token_ids.reshape(-1), temperature, return_entropy, run)
    if return_entropy:
        return out[0].reshape(token_shape), out[1].reshape(token_shape)
    return out.reshape(token_shape)


class FusedLinearLogprobs(torch.nn.Module):
    """Module form of :func:`fused_linear_logprobs`; the knobs are fixed at construction."""

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False,
                 backend: str = "auto", *, memory_budget: int | None = None,
                 validate: str = "auto"):
        super().__init__()
        self.knobs = dict(temperature=temperature, return_entropy=return_entropy,
                          backend=backend, memory_budget=memory_budget, validate=validate)

    def forward(self, hidden, weight, token_ids, bias=None):
        return fused_linear_logprobs(hidden, weight, token_ids, bias=bias, **self.knobs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
