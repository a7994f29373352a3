"""Knobs shared by every backend of the CKD loss."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CKDConfig:
    """Per-token CKD objective settings (see STAR.md, "CKD objective").

    ``tail_coef`` is lambda (weight of the confident-error mass), ``student_topm``
    is m, ``kd_ratio`` mixes KD with next-token CE, ``tail_bucket`` adds the
    (k+1)-th bucket term so the objective is a true divergence.
    """

    tail_coef: float = 10.0
    student_topm: int = 100
    kd_ratio: float = 1.0
    temperature: float = 1.0
    tail_bucket: bool = False
    ignore_index: int = -100
