"""Hugging Face integration: run a causal LM's trunk only and feed the fused ops.

A transformers causal LM (Qwen2, Qwen3, Llama, ... anything with a ``model``
trunk and an ``lm_head`` linear layer) computes ``lm_head(trunk(input_ids))``.
The helpers here call the trunk only, so no ``[tokens, vocab]`` logits are
produced, and hand its last hidden states plus the lm_head weight (tied to the
embedding or not; autograd accumulates into the shared parameter either way)
and bias to the fused ops. Gradient checkpointing
(``model.gradient_checkpointing_enable()``, ``activation_checkpointing_enable()`` in
transformers 5) and a compiled trunk (``model.model.compile()`` or ``model.model =
torch.compile(model.model)``) work unchanged; compiling the whole causal LM
instead does not speed these helpers up, as they call its trunk directly.

Per-token tensors given to the ``*_from_model`` helpers are aligned with
``input_ids`` like Hugging Face ``labels``: entry ``t`` is about token ``t``
(predicted from the prefix before it); the helpers shift by one internally.
Per-token tensors of shape ``[B, T - 1]`` are taken as already shifted (the
layout :func:`logprobs_from_model` returns).
"""

from __future__ import annotations

import torch

from .ckd import fused_linear_ckd_loss
from .grpo import fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs

__all__ = ["decoder_and_head", "hidden_states", "ckd_loss_from_model", "logprobs_from_model",
           "grpo_loss_from_model", "ckd_compute_loss", "CKDTrainerMixin"]

_WRAPPERS = ("_orig_mod", "module", "base_model")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The trunk (``model.model``) and the ``lm_head`` of a causal LM.

    Unwraps ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel``
    (``module``) and PEFT (``base_model``) wrappers. Raises ``TypeError`` for a
    model without a trunk + linear head, and ``ValueError`` for a model that
    transforms its logits after the head (soft-capping, logit scaling), which
    the fused ops do not reproduce.
    """
    m = model
    for _ in range(8):
        head = getattr(m, "lm_head", None) if "lm_head" in getattr(m, "_modules", {}) else None
        trunk = m._modules.get("model") if hasattr(m, "_modules") else None
        if head is not None and trunk is not None and "lm_head" not in trunk._modules:
            break
        inner = next((getattr(m, a) for a in _WRAPPERS + ("model",)
                      if isinstance(getattr(m, a, None), torch.nn.Module)), None)
        if inner is None or inner is m:
            head = None
            break
        m = inner
    if head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a `model` trunk and "
                        "an `lm_head` (e.g. Qwen2/Qwen3/LlamaForCausalLM)")
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"lm_head must be a torch.nn.Linear, got {type(head).__name__} "
                        "(merge adapters on the head before using the fused ops)")
    cfg = getattr(m, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the model's config sets {name}={getattr(cfg, name)!r}: its logits "
                             "are transformed after lm_head, which the fused ops do not do")
    return trunk, head


def hidden_states(model, input_ids, attention_mask=None, **trunk_kwargs):
    """``(hidden [B, T, H], weight [V, H], bias [V] or None)``: the trunk's last hidden states.

    Extra keyword arguments (``position_ids``, ...) go to the trunk; the KV
    cache is off.
    """
    trunk, head = decoder_and_head(model)
    trunk_kwargs.setdefault("use_cache", False)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, **trunk_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, head.bias


def _shifted(name, t, seq_len):
    """Drop the first position of a label-aligned ``[B, T, ...]`` tensor; pass ``[B, T-1, ...]``."""
    if t is None:
        return None
    if t.dim() < 2 or t.shape[1] not in (seq_len, seq_len - 1):
        raise ValueError(f"{name} must be [B, T, ...] (aligned with input_ids) or "
                         f"[B, T-1, ...] (already shifted), T={seq_len}; got {tuple(t.shape)}")
    return t[:, 1:] if t.shape[1] == seq_len else t


def _token_mask(name, mask, attention_mask, seq_len):
    mask = _shifted(name, mask, seq_len)
    if mask is not None and attention_mask is not None:
        mask = (mask != 0) & (_shifted("attention_mask", attention_mask, seq_len) != 0)
    return mask


def ckd_loss_from_model(model, input_ids, attention_mask, teacher_ids, teacher_logprobs,
                        loss_mask=None, *, labels=None, trunk_kwargs=None, **ckd_kwargs):
    """:func:`star_kernels.fused_linear_ckd_loss` of a causal LM on ``input_ids``.

    ``teacher_ids`` / ``teacher_logprobs`` (``[B, T, K]``), ``loss_mask`` and
    ``labels`` (``[B, T]``) are aligned with ``input_ids`` (entry ``t`` is the
    teacher's distribution for token ``t``), or already shifted to ``T - 1``.
    Tokens where ``attention_mask`` is 0 never count. Other keyword arguments
    are the CKD knobs (``tail_coef``, ``student_topm``, ``reduction``, ...).
    """
    seq_len = input_ids.shape[1]
    hidden, weight, bias = hidden_states(model, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    mask = _token_mask("loss_mask", loss_mask, attention_mask, seq_len)
    if mask is None and attention_mask is not None:
        mask = _shifted("attention_mask", attention_mask, seq_len) != 0
    return fused_linear_ckd_loss(
        hidden[:, :-1], weight, _shifted("teacher_ids", teacher_ids, seq_len),
        _shifted("teacher_logprobs", teacher_logprobs, seq_len), mask=mask, bias=bias,
        labels=_shifted("labels", labels, seq_len), **ckd_kwargs)


def logprobs_from_model(model, input_ids, attention_mask=None, temperature=1.0,
                        return_entropy=False, backend="auto", *, trunk_kwargs=None,
                        memory_budget=None):
    """Log-probs ``[B, T - 1]`` of ``input_ids[:, 1:]`` under the model (and entropies).

    Differentiable; entries at padding positions are computed but meaningless.
    """
    hidden, weight, bias = hidden_states(model, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    return fused_linear_logprobs(hidden[:, :-1], weight, input_ids[:, 1:],
                                 temperature=temperature, return_entropy=return_entropy,
                                 bias=bias, backend=backend, memory_budget=memory_budget)


def grpo_loss_from_model(model, input_ids, attention_mask, completion_mask, advantages,
                         old_logprobs=None, ref_logprobs=None, *, trunk_kwargs=None,
                         **grpo_kwargs):
    """:func:`star_kernels.fused_linear_grpo_loss` of a causal LM on prompt + completion ids.

    ``completion_mask`` (``[B, T]``, aligned with ``input_ids``) marks the
    sampled tokens; ``old_logprobs`` / ``ref_logprobs`` are ``[B, T - 1]`` as
    :func:`logprobs_from_model` returns them (or ``[B, T]`` label-aligned);
    ``advantages`` is ``[B]``. Returns ``(loss, diagnostics)``.
    """
    seq_len = input_ids.shape[1]
    hidden, weight, bias = hidden_states(model, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    mask = _token_mask("completion_mask", completion_mask, attention_mask, seq_len)
    if advantages.dim() == 2:
        advantages = _shifted("advantages", advantages, seq_len)
    return fused_linear_grpo_loss(
        hidden[:, :-1], weight, input_ids[:, 1:], advantages, mask,
        old_logprobs=_shifted("old_logprobs", old_logprobs, seq_len),
        ref_logprobs=_shifted("ref_logprobs", ref_logprobs, seq_len), bias=bias, **grpo_kwargs)


def ckd_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None,
                     **ckd_kwargs):
    """A ``Trainer.compute_loss`` body for CKD.

    ``inputs`` holds ``input_ids``, ``teacher_ids``, ``teacher_logprobs`` and
    optionally ``attention_mask``, ``loss_mask`` (else ``labels != -100``) and
    ``labels``, all aligned with ``input_ids``. With ``num_items_in_batch``
    (the Trainer's token count over gradient-accumulation steps) the loss is
    the sum over tokens divided by it, otherwise the mean over valid tokens.
    Use ``remove_unused_columns=False`` so the Trainer keeps the teacher columns.
    """
    loss_mask = inputs.get("loss_mask")
    labels = inputs.get("labels")
    if loss_mask is None and labels is not None:
        loss_mask = labels != -100
    if labels is not None and ckd_kwargs.get("kd_ratio", 1.0) == 1.0:
        labels = None
    if num_items_in_batch is not None:
        ckd_kwargs["reduction"] = "sum"
    loss = ckd_loss_from_model(model, inputs["input_ids"], inputs.get("attention_mask"),
                               inputs["teacher_ids"], inputs["teacher_logprobs"], loss_mask,
                               labels=labels, **ckd_kwargs)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return (loss, {"loss": loss}) if return_outputs else loss


class CKDTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to train with the fused CKD loss.

    ``class CKDTrainer(CKDTrainerMixin, Trainer): ckd_kwargs = dict(tail_coef=10.0)``
    """

    ckd_kwargs: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return ckd_compute_loss(model, inputs, return_outputs=return_outputs,
                                num_items_in_batch=num_items_in_batch, **dict(self.ckd_kwargs))
