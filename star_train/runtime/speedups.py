"""Optional GPU speed-ups of the trained model's trunk: flash-attention 2 and Liger's kernels.

Both come from the ``gpu`` extra (``pip install "star-kernels[gpu]"``) and only help on
CUDA; on CPU or without the packages the model keeps transformers' own attention (sdpa)
and modules, so a config written for a GPU still runs anywhere. The lm_head is never
touched: the loss is always the fused ``star_kernels`` op on the trunk's hidden states.

* ``train.attn_implementation = "auto"`` picks ``flash_attention_2`` on CUDA when
  ``flash_attn`` imports, else ``sdpa``. Packed micro-batches (``train.packing``:
  restarting ``position_ids``, no attention mask) then run through flash-attention's
  variable-length kernels, which transformers selects from the position ids. Asking for
  ``flash_attention_2`` explicitly where it cannot run is an error naming the key.
* ``train.liger_kernels = true`` swaps RMSNorm, SwiGLU and RoPE for Liger's Triton kernels
  (its cross-entropy paths stay off: they would materialise what our fused head avoids).
  Liger patches the model class's module functions too, so other models of the same
  architecture in the process (a loaded teacher) use them as well.
"""

from __future__ import annotations

import importlib.util

import torch


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def pick_attention(requested: str, device: torch.device) -> str:
    """The attention implementation ``train.attn_implementation`` means on ``device``."""
    if requested == "auto":
        return "flash_attention_2" if device.type == "cuda" and installed("flash_attn") else "sdpa"
    if requested == "flash_attention_2" and (device.type != "cuda" or not installed("flash_attn")):
        raise ValueError("train.attn_implementation = 'flash_attention_2' needs a CUDA device and the "
                         "flash-attn package (pip install \"star-kernels[gpu]\"); use 'auto' to fall "
                         "back to sdpa elsewhere")
    return requested


def set_attention(model, name: str) -> None:
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)


def apply_liger_trunk(model, device: torch.device, log=print) -> bool:
    """Liger's RMSNorm/SwiGLU/RoPE on ``model`` when they can run; False (and one log line
    saying why) when the model keeps its own modules."""
    if device.type != "cuda":
        log("train.liger_kernels: Liger's Triton kernels need CUDA; the trunk keeps its own modules")
        return False
    if not installed("liger_kernel"):
        log("train.liger_kernels: liger-kernel is not installed (pip install \"star-kernels[gpu]\"); "
            "the trunk keeps its own modules")
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log(f"train.liger_kernels: Liger has no kernels for model type {model.config.model_type!r}; "
            "the trunk keeps its own modules")
        return False
    # The underscore name is Liger's documented per-instance entry point (TRL calls it too).
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True
