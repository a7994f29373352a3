"""Settings objects: the CKD objective's knobs, and one frozen options object per op.

Each op's autograd Function takes ``(tensors..., options)``: the tensors autograd
must see, then one of the ``*Options`` below holding everything else, so the
Function's signature and its backward's ``None`` list do not grow with every knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class CKDConfig:
    """Per-token CKD objective settings (see STAR.md, "CKD objective").

    ``tail_coef`` is lambda (weight of the confident-error mass), ``student_topm``
    is m, ``kd_ratio`` mixes KD with next-token CE, ``tail_bucket`` adds the
    (k+1)-th bucket term so the objective is a true divergence (fkl only), and
    ``kd_type`` is the divergence over the teacher's entries: "fkl", "rkl" or "akl".
    """

    tail_coef: float = 10.0
    student_topm: int = 100
    kd_ratio: float = 1.0
    temperature: float = 1.0
    tail_bucket: bool = False
    ignore_index: int = -100
    kd_type: str = "fkl"


@dataclass(frozen=True)
class RunOptions:
    """How any fused op runs: a concrete backend, the chunk workspace budget in bytes,
    and the dtype of its GEMMs (the inputs are cast to it inside the Function)."""

    backend: str
    memory_budget: int
    compute_dtype: torch.dtype


@dataclass(frozen=True)
class CKDOptions:
    run: RunOptions
    cfg: CKDConfig
    reduction: str


@dataclass(frozen=True)
class LogprobOptions:
    run: RunOptions
    temperature: float
    want_entropy: bool


@dataclass(frozen=True)
class GRPOOptions:
    """``terms(logp, adv, old, ref)`` gives the per-token loss and its derivative."""

    run: RunOptions
    temperature: float
    terms: Callable
