"""star-kernels: fused lm_head losses for distilling and RL-tuning tiny function-calling models."""

from ._backends import BackendUnavailableError
from .ckd import FusedLinearCKDLoss, fused_linear_ckd_loss

__all__ = ["BackendUnavailableError", "FusedLinearCKDLoss", "fused_linear_ckd_loss"]
__version__ = "0.1.0"
