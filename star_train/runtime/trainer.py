"""What both training stages set up the same way: the run folder, the optimizer, checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import config_to_dict


def open_run(cfg) -> Path:
    """Create ``train.out_dir`` and record the run's full config in it."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    return out


def enable_gradient_checkpointing(model) -> None:
    # transformers 5 renamed the method; the old name still works there but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()


def optimizer_and_scheduler(model, train) -> tuple:
    """AdamW over the fp32 parameters; linear warm-up over ``train.warmup_steps``, then constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr,
                                  weight_decay=train.weight_decay)
    warmup = train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def fused_op_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype to hand the fused lm_head ops, called inside the autocast region.

    Under autocast the trunk's residual stream (and so its final norm's output) stays in
    the fp32 of the parameters, while the fused ops run their GEMMs in the dtype they are
    given: without a cast a bf16 run would do its lm_head work in fp32.
    """
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype
