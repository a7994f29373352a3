"""Fused linear top-k log-probs: hidden states + lm_head weight -> a teacher's top-k.

What a teacher cache stores for CKD: per token, the ``k`` most likely ids of
``log_softmax((hidden @ weight.T + bias) / temperature)`` and their log-probs
(normalised over the full vocabulary), or, with ``sample=True``, ``k`` draws with
replacement merged per id (the unbiased sparse target of "Sparse Logit
Sampling"). Rows are processed in chunks (see :mod:`star_kernels._chunked`); no
``[tokens, vocab]`` tensor is allocated and nothing is differentiated.
"""

from __future__ import annotations

import torch

from . import _backends
from . import _validation as V
from ._chunked import cast_operands, rows_per_chunk, run_chunks


def _sample_rows(logits, k, temperature, generator):
    """``k`` draws per row from ``softmax(logits / T)``, merged per id.

    Returns ``(ids [C, k], logprobs [C, k])``: distinct drawn ids with
    ``log(count / k)``, sorted descending (ties by ascending id), then padding
    (id 0, ``-inf``).
    """
    c = logits.shape[0]
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(z / temperature if temperature != 1.0 else z, dim=1)
    if c == 0:
        return (torch.zeros(0, k, dtype=torch.long, device=logits.device),
                torch.zeros(0, k, dtype=torch.float32, device=logits.device))
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    del probs, z
    draws = draws.sort(1).values
    new_run = torch.ones_like(draws, dtype=torch.bool)
    new_run[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = new_run.long().cumsum(1) - 1                   # run index of each draw
    counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, run, draws)  # ascending distinct ids
    # Stable descending sort by count keeps ascending ids among equal counts.
    counts, order = counts.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    drawn = counts > 0
    logprobs = torch.where(drawn, (counts.float() / k).log(), float("-inf"))
    return torch.where(drawn, ids, 0), logprobs


@torch.no_grad()
def fused_linear_topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    *,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and full-vocabulary log-probs of ``softmax((hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``; ``weight``: ``[V, H]``; ``bias``: ``[V]``.
            Under ``torch.autocast`` the GEMMs run in the autocast dtype; mixed
            dtypes outside it run in the lower precision.
        k: entries per token, ``1 <= k <= V``.
        sample: ``False``: the exact top-k, sorted descending (equal values in
            ascending id order). ``True``: ``k`` draws with replacement from the
            distribution (``generator`` seeds them), each weighted ``1/k`` and
            merged per id, so entries are ``log(count / k)`` sorted descending,
            padded with id 0 / ``-inf`` where fewer than ``k`` distinct ids
            were drawn. Either output feeds :func:`fused_linear_ckd_loss` as is.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"`` (sampling
            runs the same chunked PyTorch code on every backend).
        memory_budget: bytes of transient chunk workspace.

    Returns ``(ids int64 [..., k], logprobs float32 [..., k])``. No gradient, and
    no value checks (nothing here indexes by a caller's ids), so no host sync.
    """
    V.check_linear(hidden, weight, bias)
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    V.check_positive("temperature", temperature)
    V.check_memory_budget(memory_budget)
    if generator is not None:
        if not sample:
            raise ValueError("generator is only used with sample=True")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != hidden.device.type:
            raise ValueError(f"generator is on {generator.device} but hidden is on {hidden.device}")
    backend = _backends.resolve(backend, hidden.device)
    dtype = _backends.compute_dtype(hidden, weight, bias)
    budget = memory_budget or _backends.default_memory_budget(hidden.device)
    temperature = float(temperature)

    token_shape = hidden.shape[:-1]
    with _backends.no_autocast(hidden.device):
        h, w, b = cast_operands(hidden.reshape(-1, hidden.shape[-1]), weight, bias, dtype)
        if sample:
            def row_op(logits, scale):
                return _sample_rows(logits, k, temperature, generator), None
            bytes_per_logit = h.element_size() + 3 * 4
        else:
            topk_rows, workspace = _backends.row_functions(backend, "topk")

            def row_op(logits, scale):
                return topk_rows(logits, k, temperature), None
            bytes_per_logit = workspace(h.dtype)
        chunk = rows_per_chunk(h.shape[0], vocab, bytes_per_logit, budget)
        (ids, logprobs), *_ = run_chunks(h, w, b, row_op, (), None, chunk)
    return ids.reshape(*token_shape, k), logprobs.reshape(*token_shape, k)


class FusedLinearTopKLogprobs(torch.nn.Module):
    """Module form of :func:`fused_linear_topk_logprobs`; the knobs are fixed at construction."""

    def __init__(self, k: int, temperature: float = 1.0, sample: bool = False,
                 backend: str = "auto", *, memory_budget: int | None = None):
        super().__init__()
        self.knobs = dict(k=k, temperature=temperature, sample=sample, backend=backend,
                          memory_budget=memory_budget)

    def forward(self, hidden, weight, bias=None, generator=None):
        return fused_linear_topk_logprobs(hidden, weight, bias=bias, generator=generator,
                                          **self.knobs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
