"""Fused linear GRPO loss: PPO-clipped policy loss + KL to a reference, from hidden states.

The loss is a cheap elementwise function of the per-token log-probs of the
sampled tokens, so it is built on :func:`star_kernels.fused_linear_logprobs`'s
autograd: only the masked-in tokens are evaluated, and no ``[tokens, vocab]``
tensor exists in the forward or the backward pass.
"""

from __future__ import annotations

import functools

import torch

from . import _backends
from . import _validation as V
from ._chunked import cast_operands, finish_grad, rows_per_chunk, run_chunks
from ._config import GRPOOptions
from .logprobs import check_logprob_args, run_options

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean", "dr_grpo")


def _clip_range(clip_eps):
    if isinstance(clip_eps, (tuple, list)):
        if len(clip_eps) != 2:
            raise ValueError(f"clip_eps must be a number or a (low, high) pair, got {clip_eps!r}")
        low, high = clip_eps
    else:
        low = high = clip_eps
    for x in (low, high):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < float("inf"):
            raise ValueError(f"clip_eps must be finite and >= 0, got {clip_eps!r}")
    return float(low), float(high)


def _check_grpo_args(hidden, weight, token_ids, advantages, mask, old_logprobs, ref_logprobs,
                     bias, temperature, kl_coef, kl_estimator, loss_agg, memory_budget,
                     validate, kl_clamp=None):
    """Structure checks now; the value checks go into the returned collector (or none)."""
    check_logprob_args(hidden, weight, token_ids, bias, temperature, memory_budget)
    token_shape, device = hidden.shape[:-1], hidden.device
    V.check_token_tensor("mask", mask, token_shape, device,
                         (torch.bool, torch.uint8, torch.int32, torch.int64))
    checks = V.value_checks(validate, "grpo", device)
    keep = mask != 0
    if checks is not None:
        V.check_ids_in_vocab(checks, "token_ids", token_ids, weight.shape[0], where=keep)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    per_sequence = hidden.dim() == 3 and advantages.dim() == 1
    if per_sequence:
        V.check_token_tensor("advantages", advantages, token_shape[:1], device, V.FLOAT_DTYPES)
    else:
        if advantages.dim() != len(token_shape):
            per_seq = f"[B]={list(token_shape[:1])} or " if hidden.dim() == 3 else ""
            raise ValueError(f"advantages must have shape {per_seq}{list(token_shape)}, "
                             f"got {tuple(advantages.shape)}")
        V.check_token_tensor("advantages", advantages, token_shape, device, V.FLOAT_DTYPES)
    if checks is not None:
        V.check_finite_where(checks, "advantages", advantages, None if per_sequence else keep)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            V.check_token_tensor(name, t, token_shape, device, V.FLOAT_DTYPES)
            if checks is not None:
                V.check_finite_where(checks, name, t, keep)
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) \
            or not 0.0 <= kl_coef < float("inf"):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    V.check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_clamp is not None and (isinstance(kl_clamp, bool)
                                 or not isinstance(kl_clamp, (int, float))
                                 or not 0.0 < kl_clamp < float("inf")):
        raise ValueError(f"kl_clamp must be None or a finite number > 0, got {kl_clamp!r}")
    V.check_choice("loss_agg", loss_agg, LOSS_AGGS)
    return checks


def kl_penalty(logp, ref_logp, estimator, kl_clamp=None):
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, its value
    clamped to ``[-kl_clamp, kl_clamp]`` unless ``kl_clamp`` is ``None``."""
    if estimator == "k1":
        kl = logp - ref_logp
    elif estimator == "k2":
        kl = 0.5 * (logp - ref_logp) ** 2
    else:
        d = ref_logp - logp
        kl = torch.expm1(d) - d
    return kl if kl_clamp is None else kl.clamp(-kl_clamp, kl_clamp)


def token_terms(logp, adv, old, ref, low, high, kl_coef, estimator, kl_clamp=None):
    """Per-token GRPO loss, its derivative in ``logp``, and the diagnostics' terms.

    ``old is None`` means on-policy (ratio 1, d ratio / d logp = 1). The
    derivative follows autograd's conventions for ``min`` and ``clamp``: the
    surrogate's gradient is ``-A * ratio`` where the unclipped branch is active
    or the ratio lies inside the clip range, else 0; the KL term's is 0 where its
    value lies outside ``[-kl_clamp, kl_clamp]``.
    """
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    clipped = ratio.clamp(1.0 - low, 1.0 + high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    inside = (ratio >= 1.0 - low) & (ratio <= 1.0 + high)
    dloss = torch.where(inside | (ratio * adv < clipped * adv), -adv * ratio, 0.0)
    clip_active = ((ratio < 1.0 - low) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    kl = None
    if ref is not None:
        raw = kl_penalty(logp, ref, estimator)
        kl = raw if kl_clamp is None else raw.clamp(-kl_clamp, kl_clamp)
        if kl_coef != 0:
            loss = loss + kl_coef * kl
            if estimator == "k1":
                dkl = torch.ones_like(logp)
            elif estimator == "k2":
                dkl = logp - ref
            else:
                dkl = 1.0 - torch.exp(ref - logp)
            if kl_clamp is not None:
                dkl = torch.where(raw.abs() <= kl_clamp, dkl, 0.0)
            dloss = dloss + kl_coef * dkl
    return loss, dloss, ratio, clip_active, kl


class _GRPOFunction(torch.autograd.Function):
    """Masked-in rows only; returns ``(loss, logp)`` with the gradients made in forward.

    The per-token loss is an elementwise function of the token's log-prob, so its
    derivative is known as soon as a chunk's log-probs are: each chunk's logits
    are turned into the gradient right away and never recomputed (three GEMMs,
    as for CKD). ``token_weight`` holds each token's weight in the aggregate.
    Inputs are cast to the compute dtype here, out of autograd's sight (see
    :mod:`star_kernels.ckd`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, adv, old, ref, token_weight,
                opts: GRPOOptions):
        run, terms, temperature = opts.run, opts.terms, opts.temperature
        needs = ctx.needs_input_grad
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        logprob_rows, workspace = _backends.row_functions(run.backend, "logprob")

        def row_op(logits, ids_c, adv_c, old_c, ref_c, weight_c):
            if weight_c is None:
                logp, _, _ = logprob_rows(logits, ids_c, temperature, False)
                return (logp,), None

            def upstream(logp):
                d = terms(logp.to(adv_c.dtype), adv_c, old_c, ref_c)[1]
                # where, not a product: a 0-weight (masked) row's term may overflow
                return torch.where(weight_c > 0, weight_c * d, 0.0)

            if run.backend == "torch":  # its row op calls ``upstream`` between the passes
                logp, _, dlogits = logprob_rows(logits, ids_c, temperature, False, upstream)
            else:  # value pass (leaves the logits intact), then the gradient pass
                logp, _, _ = logprob_rows(logits, ids_c, temperature, False)
                _, _, dlogits = logprob_rows(logits, ids_c, temperature, False, upstream(logp))
            return (logp,), dlogits

        with _backends.no_autocast(hidden.device):
            h, w, b = cast_operands(hidden, weight, bias, run.compute_dtype)
            chunk = rows_per_chunk(h.shape[0], w.shape[0], workspace(h.dtype), run.memory_budget)
            with_grad = any(needs[:3])
            (logp,), gh, gw, gb = run_chunks(
                h, w, b, row_op, (token_ids, adv, old, ref),
                token_weight if with_grad else None, chunk,
                need_grad_hidden=needs[0], need_grad_weight=needs[1] or needs[2])
        logp = logp.to(adv.dtype)
        per_token = terms(logp, adv, old, ref)[0]
        loss = torch.where(token_weight > 0, token_weight * per_token, 0.0).sum()
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        needs = ctx.needs_input_grad
        grads = [finish_grad(g, dtype, grad_loss) if need else None
                 for g, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, needs)]
        return (*grads, *([None] * 6))


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_eps: float | tuple[float, float] = 0.2,
    kl_coef: float = 1e-3,
    kl_estimator: str = "k2",
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    kl_clamp: float | None = 10.0,
    memory_budget: int | None = None,
    validate: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / PPO-clipped policy loss with a KL penalty, fused with the lm_head.

    Per masked-in token, with ``logp`` the policy log-prob of the sampled token
    (``softmax(logits / temperature)``), ``ratio = exp(logp - old_logprobs)``:
    ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + kl_coef * KL``.

    Args:
        hidden: ``[B, T, H]`` (or ``[N, H]``, one sequence) aligned with ``token_ids``.
        weight: ``[V, H]``; ``bias``: optional ``[V]``. Under ``torch.autocast``
            the GEMMs run in the autocast dtype; mixed dtypes outside it run in
            the lower precision. Gradients come back in each input's own dtype.
        token_ids: ``[B, T]`` sampled tokens (ids under a false mask are ignored).
        advantages: ``[B]`` per sequence (broadcast over tokens) or per token
            ``[B, T]``; must be finite.
        mask: ``[B, T]``, true for the completion tokens that count. Selecting
            them costs one host synchronisation (their count); where one is not
            allowed (CUDA graph capture, ``torch.compile`` tracing) masked rows
            are computed and weighted 0 instead.
        old_logprobs: behaviour-policy log-probs ``[B, T]``; ``None`` means
            on-policy (``ratio = exp(logp - logp.detach())``, value 1, gradient
            of ``logp``).
        ref_logprobs: reference-policy log-probs ``[B, T]``; ``None`` or
            ``kl_coef == 0`` disables the KL term.
        clip_eps: ``eps`` or a ``(eps_low, eps_high)`` pair.
        kl_estimator: ``"k1"`` (``logp - ref``), ``"k2"`` (``0.5 * (logp -
            ref)^2``, STAR's choice) or ``"k3"`` (``exp(ref - logp) - (ref -
            logp) - 1``).
        kl_clamp: the estimator's per-token value is clamped to ``[-kl_clamp,
            kl_clamp]`` (no gradient where it is clamped), as the released code
            (OpenRLHF's ``compute_approx_kl``) does with 10; ``None`` disables it.
            ``mean_kl`` reports the clamped value.
        loss_agg: ``"token_mean"`` (masked mean over all tokens),
            ``"seq_mean"`` (mean over sequences with at least one token of each
            sequence's masked mean) or ``"dr_grpo"`` (masked sum / (B * T)).
        backend, memory_budget: as in :func:`fused_linear_logprobs`.
        validate: when the values are checked (``token_ids`` in the vocabulary
            and finite ``advantages``, ``old_logprobs`` and ``ref_logprobs`` at
            masked-in tokens): ``"auto"`` (every call on CPU, the first call on
            CUDA), ``"full"`` or ``"shapes"`` (never).

    Returns ``(loss, diagnostics)``: the scalar loss (float32; float64 for
    float64 inputs; 0 with zero gradients for an all-false mask) and detached
    masked token means ``clip_fraction`` (tokens whose clipped branch is
    active), ``mean_kl`` (of the chosen estimator; 0 without ``ref_logprobs``)
    and ``mean_ratio``, plus ``logprobs``: the detached log-probs of
    ``token_ids`` under the current weights, shaped like ``token_ids`` (0 where
    ``mask`` is false). On-policy (``old_logprobs=None``) they are the
    behaviour log-probs a later PPO epoch needs, without another forward pass.
    """
    low, high = _clip_range(clip_eps)
    checks = _check_grpo_args(hidden, weight, token_ids, advantages, mask, old_logprobs,
                              ref_logprobs, bias, temperature, kl_coef, kl_estimator, loss_agg,
                              memory_budget, validate, kl_clamp)
    run = run_options(hidden, weight, bias, backend, memory_budget)
    if checks is not None:
        checks.run()
    n_seq, seq_len = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 \
        else (1, hidden.shape[0])
    ctype = torch.promote_types(run.compute_dtype, torch.float32)
    flat_keep = mask.reshape(-1) != 0
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1)
    if _backends.host_sync_forbidden(hidden.device):
        # No row selection: every row runs, masked ones weighted 0 (and their inputs
        # zeroed, so garbage there stays out of the arithmetic).
        rows, keep = torch.arange(ids.numel(), device=ids.device), flat_keep
        count = flat_keep.sum().clamp_min(1)
        ids = torch.where(keep, ids, 0)
    else:
        rows = flat_keep.nonzero().squeeze(1)  # the mask's one host synchronisation
        keep, count = None, max(rows.numel(), 1)
        h, ids = h[rows], ids[rows]

    def pick(t, index=rows):
        t = t.to(ctype)[index]
        return t if keep is None else torch.where(keep, t, 0.0)

    per_sequence = hidden.dim() == 3 and advantages.dim() == 1
    adv = pick(advantages, rows // seq_len) if per_sequence else pick(advantages.reshape(-1))
    old, ref = (None if t is None else pick(t.reshape(-1)) for t in (old_logprobs, ref_logprobs))
    kept = torch.ones_like(adv) if keep is None else keep.to(ctype)
    if loss_agg == "token_mean":
        token_weight = kept / count
    elif loss_agg == "dr_grpo":
        token_weight = kept / max(n_seq * seq_len, 1)
    else:  # each present sequence's masked mean, averaged over present sequences
        seq = rows // seq_len
        lengths = torch.zeros(n_seq, dtype=ctype, device=adv.device).index_add_(0, seq, kept)
        present = (lengths > 0).sum().clamp_min(1)  # a tensor: no host synchronisation
        token_weight = kept / (lengths[seq].clamp_min(1) * present)

    terms = functools.partial(token_terms, low=low, high=high, kl_coef=kl_coef,
                              estimator=kl_estimator,
                              kl_clamp=None if kl_clamp is None else float(kl_clamp))
    opts = GRPOOptions(run, float(temperature), terms)
    loss, logp = _GRPOFunction.apply(h, weight, bias, ids, adv, old, ref, token_weight, opts)
    _, _, ratio, clip_active, kl = terms(logp, adv, old, ref)

    def token_mean(x):
        x = x.to(ctype)
        return (x if keep is None else torch.where(keep, x, 0.0)).sum() / count

    logp = logp.to(ctype) if keep is None else torch.where(keep, logp.to(ctype), 0.0)
    diagnostics = {
        "clip_fraction": token_mean(clip_active),
        "mean_kl": torch.zeros((), dtype=ctype, device=hidden.device) if kl is None
        else token_mean(kl),
        "mean_ratio": token_mean(ratio),
        "logprobs": torch.zeros(token_ids.numel(), dtype=ctype, device=hidden.device)
        .index_copy_(0, rows, logp).view(token_ids.shape),
    }
    return loss.to(ctype), diagnostics

class FusedLinearGRPOLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_grpo_loss`; the knobs are fixed at construction."""

    def __init__(self, clip_eps: float | tuple[float, float] = 0.2, kl_coef: float = 1e-3,
                 kl_estimator: str = "k2", temperature: float = 1.0,
                 loss_agg: str = "token_mean", backend: str = "auto", *,
                 kl_clamp: float | None = 10.0, memory_budget: int | None = None,
                 validate: str = "auto"):
        super().__init__()
        self.knobs = dict(clip_eps=clip_eps, kl_coef=kl_coef, kl_estimator=kl_estimator,
                          temperature=temperature, loss_agg=loss_agg, backend=backend,
                          kl_clamp=kl_clamp, memory_budget=memory_budget, validate=validate)

    def forward(self, hidden, weight, token_ids, advantages, mask, old_logprobs=None,
                ref_logprobs=None, bias=None):
        return fused_linear_grpo_loss(hidden, weight, token_ids, advantages, mask,
                                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                      bias=bias, **self.knobs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
