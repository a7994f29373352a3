"""Input checks that run before any kernel, with errors that name the argument.

Two kinds of checks:

- *Structure* (always, free): types, shapes, dtypes, devices and the scalar
  knobs. These read only tensor metadata.
- *Values* (ids inside the vocabulary, no NaN/inf where forbidden, teacher
  log-probs that are log-probabilities, no repeated teacher ids): these need
  reductions over the data and one host synchronisation to read their result.
  All of a call's value checks are collected in a :class:`ValueChecks` and read
  with a single ``tolist()``; the detail for the message is computed only when
  a check fails.

Which calls run the value checks is the ops' ``validate`` argument:
``"full"`` every call; ``"shapes"`` never; ``"auto"`` (the default) every call
on CPU tensors, where the synchronisation costs nothing, and on other devices
(CUDA) only on the first call of each op in the process, so the hot path of a
training loop has no host synchronisation (it catches wrong inputs wired in
once, such as logits passed as log-probs; later bad values are not caught).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
VALIDATE_MODES = ("auto", "full", "shapes")

# Teacher probability mass per token may exceed 1 by this much (rounding of a
# 16-bit cache) before the values are taken for something other than log-probs.
TEACHER_MASS_TOLERANCE = 1e-2

_validated_ops: set = set()


def _fail(message: str):
    raise ValueError(message)


def value_checks(validate: str, op: str, device: torch.device) -> ValueChecks | None:
    """The collector for this call of ``op``, or ``None`` when it skips value checks."""
    check_choice("validate", validate, VALIDATE_MODES)
    if validate == "shapes":
        return None
    if validate == "auto" and device.type != "cpu" and op in _validated_ops:
        return None
    return ValueChecks(op)


class ValueChecks:
    """Value checks of one call: device-side flags, read with one host sync in :meth:`run`."""

    def __init__(self, op: str):
        self.op = op
        self._flags = []
        self._messages = []

    def add(self, bad: torch.Tensor, message):
        """``bad``: a bool scalar tensor; ``message()``: the error text, built on failure."""
        self._flags.append(bad.reshape(()))
        self._messages.append(message)

    def run(self):
        if self._flags:
            flags = torch.stack(self._flags).tolist()  # the one host synchronisation
            for bad, message in zip(flags, self._messages):
                if bad:
                    _fail(message())
        _validated_ops.add(self.op)


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``hidden`` is ``[N, H]`` or ``[B, T, H]``; ``weight`` is ``[V, H]``; ``bias`` is ``[V]``.

    Their floating dtypes may differ: the op runs in one compute dtype (see
    :func:`star_kernels._backends.compute_dtype`).
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
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
    if weight.device != hidden.device:
        _fail(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            _fail(f"bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
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


def check_memory_budget(memory_budget):
    if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
        _fail(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")


def check_ids_in_vocab(checks: ValueChecks, name, ids, vocab, allow=None, where=None):
    """Every id in [0, vocab), except entries equal to ``allow`` (an ignore index) or
    outside ``where`` (a bool mask of the same shape)."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if allow is not None:
        bad &= ids != allow
    if where is not None:
        bad &= where

    def message():
        return f"{name} holds id {ids[bad][0].item()} outside the vocabulary [0, {vocab})"
    checks.add(bad.any(), message)


def check_finite_where(checks: ValueChecks, name, t, where=None):
    """No NaN or inf in ``t`` (only where ``where`` is true, when given)."""
    bad = ~torch.isfinite(t)
    if where is not None:
        bad &= where

    def message():
        kind = "NaN" if torch.isnan(t[bad]).any() else "inf"
        return f"{name} holds {kind} at a masked-in token"
    checks.add(bad.any(), message)


def check_teacher(teacher_ids, teacher_logprobs, token_shape, vocab, device,
                  checks: ValueChecks | None):
    """Teacher top-k: shapes always; with ``checks``, the values: ids in range,
    log-probs finite or -inf (padding), log-probabilities (<= 0, at most 1 in
    total per token), no repeated ids."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
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
    if checks is None or teacher_ids.numel() == 0:
        return
    check_ids_in_vocab(checks, "teacher_ids", teacher_ids, vocab)
    lp = teacher_logprobs
    checks.add(torch.isnan(lp).any() | (lp == float("inf")).any(),
               lambda: "teacher_logprobs holds NaN or +inf (only -inf is allowed, as padding)")
    _check_log_probabilities(checks, lp)
    if k > 1:
        # Padding entries (-inf) may repeat ids; ranked entries may not, or the
        # teacher set S would count one token twice.
        ranked = torch.where(torch.isfinite(lp), teacher_ids.long(), -1)
        ranked = ranked.reshape(-1, k).sort(dim=1).values
        repeated = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
        checks.add(repeated.any(),
                   lambda: "teacher_ids repeats an id within one token's top-k "
                           "(merge duplicates before calling; padding entries use -inf)")


def _check_log_probabilities(checks: ValueChecks, lp):
    """Logits passed for log-probs: a value above 0, or a token whose probabilities
    add up to more than 1. One reduction: per-token logsumexp (>= every entry)."""
    limit = math.log1p(TEACHER_MASS_TOLERANCE)
    mass = torch.logsumexp(lp.reshape(-1, lp.shape[-1]).float(), dim=1)
    worst = mass.nan_to_num(nan=-math.inf).amax()

    def message():
        top = lp.float().nan_to_num(nan=-math.inf).max().item()
        what = (f"holds {top:.4g} > 0" if top > limit else
                f"has a token whose probabilities add up to {math.exp(worst.item()):.4g} > 1")
        return (f"teacher_logprobs {what}: expected the teacher's log-probabilities "
                "(log_softmax over its full vocabulary, then top-k; -inf for padding), "
                "not logits")
    checks.add(worst > limit, message)


def check_choice(name, value, choices):
    if value not in choices:
        _fail(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name, value):
    if not (value > 0 and value != float("inf")):
        _fail(f"{name} must be a positive finite number, got {value!r}")
