"""Input checks that run before any kernel, with errors that name the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def _fail(message: str):
    raise ValueError(message)


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``hidden`` is ``[N, H]`` or ``[B, T, H]``; ``weight`` is ``[V, H]``; ``bias`` is ``[V]``."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if hidden.dim() not in (2, 3):
        _fail(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        _fail(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        _fail(f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[-1]}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        _fail(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            _fail(f"bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            _fail(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_token_tensor(name, t, token_shape, device, dtypes, trailing=()):
    """A per-token tensor shaped ``token_shape + trailing`` on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = tuple(token_shape) + tuple(trailing)
    if tuple(t.shape) != want:
        _fail(f"{name} must have shape {want} to match hidden, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        _fail(f"{name} is on {t.device} but hidden is on {device}")


def check_ids_in_vocab(name, ids, vocab, allow=None):
    """Every id in [0, vocab), except entries equal to ``allow`` (an ignore index)."""
    if ids.numel() == 0:
        return
    checked = ids if allow is None else ids[ids != allow]
    if checked.numel() and (checked.min() < 0 or checked.max() >= vocab):
        bad = checked[(checked < 0) | (checked >= vocab)][0].item()
        _fail(f"{name} holds id {bad} outside the vocabulary [0, {vocab})")


def check_teacher(teacher_ids, teacher_logprobs, token_shape, vocab, device):
    """Teacher top-k: ids in range, log-probs finite or -inf (padding), no repeated ids."""
    if teacher_ids.dim() != len(token_shape) + 1:
        _fail(f"teacher_ids must have shape {tuple(token_shape)} + (K,), "
              f"got {tuple(teacher_ids.shape)}")
    k = teacher_ids.shape[-1]
    check_token_tensor("teacher_ids", teacher_ids, token_shape, device, INT_DTYPES, (k,))
    check_token_tensor("teacher_logprobs", teacher_logprobs, token_shape, device,
                       FLOAT_DTYPES, (k,))
    if k < 1:
        _fail("teacher_ids must hold at least one id per token (K >= 1)")
    if k > vocab:
        _fail(f"teacher K={k} is larger than the vocabulary V={vocab}")
    check_ids_in_vocab("teacher_ids", teacher_ids, vocab)
    if torch.isnan(teacher_logprobs).any() or (teacher_logprobs == float("inf")).any():
        _fail("teacher_logprobs holds NaN or +inf (only -inf is allowed, as padding)")
    if k > 1:
        # Padding entries (-inf) may repeat ids; ranked entries may not, or the
        # teacher set S would count one token twice.
        ranked = torch.where(torch.isfinite(teacher_logprobs), teacher_ids.long(), -1)
        ranked = ranked.reshape(-1, k).sort(dim=1).values
        repeated = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
        if repeated.any():
            _fail("teacher_ids repeats an id within one token's top-k "
                  "(merge duplicates before calling; padding entries use -inf)")


def check_choice(name, value, choices):
    if value not in choices:
        _fail(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name, value):
    if not (value > 0 and value != float("inf")):
        _fail(f"{name} must be a positive finite number, got {value!r}")
