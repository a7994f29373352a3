"""star-kernels: fused lm_head losses for distilling and RL-tuning tiny function-calling models."""

from ._backends import BackendUnavailableError
from .ckd import FusedLinearCKDLoss, fused_linear_ckd_loss
from .grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .logprobs import FusedLinearLogprobs, fused_linear_logprobs
from .topk import FusedLinearTopKLogprobs, fused_linear_topk_logprobs
from .vocab_parallel import (
    vocab_parallel_linear_ckd_loss,
    vocab_parallel_linear_grpo_loss,
    vocab_parallel_linear_logprobs,
    vocab_shard_range,
)

__all__ = ["BackendUnavailableError", "FusedLinearCKDLoss", "FusedLinearGRPOLoss",
           "FusedLinearLogprobs", "FusedLinearTopKLogprobs", "fused_linear_ckd_loss",
           "fused_linear_grpo_loss", "fused_linear_logprobs", "fused_linear_topk_logprobs",
           "vocab_parallel_linear_ckd_loss", "vocab_parallel_linear_grpo_loss",
           "vocab_parallel_linear_logprobs",
           "vocab_shard_range"]
__version__ = "0.1.0"
