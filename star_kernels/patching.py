"""Patch a transformers causal LM so that ``model(**batch)`` computes the fused loss itself.

The way Liger-Kernel (``apply_liger_kernel_to_qwen3``) and cut-cross-entropy
(``cce_patch(model)``) integrate: the loss is computed inside ``forward``, so whatever
wraps ``forward`` -- accelerate's autocast, DDP, DeepSpeed, FSDP, ``torch.compile`` --
applies unchanged and the training loop keeps calling ``model(**batch)``.

A patched forward takes three extra keyword arguments and behaves exactly as before
when none of them is given (same outputs, same ``generate``):

* ``teacher_ids`` / ``teacher_logprobs`` (``[B, T - 1, K]``, one entry per next-token
  prediction, as :func:`star_kernels.hf.teacher_topk_from_model` returns them): the
  output's ``loss`` is the fused CKD loss over the tokens where ``loss_mask`` (or
  ``labels != -100``) and ``attention_mask`` are set, and ``logits`` is ``None``;
  with ``num_items_in_batch`` (what ``Trainer`` passes) the sum over tokens divided
  by it, else the mean.
* ``fused_logprobs=True`` (for RL): ``log_probs`` (``[B, T - 1]``, of
  ``input_ids[:, 1:]``) and, with ``return_entropy=True``, ``entropy``; no logits.
* ``ckd_kwargs``: CKD knobs for this call, over the ones given when patching.

Positions follow :mod:`star_kernels.hf`. Families: Qwen2, Qwen3, Llama (SmolLM2),
Mistral, Gemma2 and Gemma3 (text). Gemma2's default config soft-caps its logits
(``final_logit_softcapping``), which the fused ops do not compute, so patching such a
model is refused rather than silently training on a different distribution.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from . import hf

__all__ = ["FAMILIES", "FusedCausalLMOutput", "is_patched", "patch_class", "patch_model",
           "unpatch_class", "unpatch_model"]

# family -> transformers class name; the families the tests cover.
FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}

_ORIGINAL = "_star_original_forward"
_DEFAULTS = "_star_ckd_kwargs"
_FUSED_KEYS = ("teacher_ids", "teacher_logprobs", "loss_mask", "fused_logprobs",
               "return_entropy", "ckd_kwargs")
# Keyword arguments of a causal LM's forward that belong to its head or its loss, not the trunk.
_HEAD_KEYS = ("labels", "num_items_in_batch", "logits_to_keep", "return_dict", "use_cache",
              "past_key_values", "shift_labels")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of a patched forward called with teacher tensors or ``fused_logprobs=True``.

    ``logits`` is always ``None``: not computing them is the point.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _split_inputs(args, kwargs):
    """``(input_ids, attention_mask, trunk_kwargs)`` from a forward call's arguments."""
    kwargs = dict(kwargs)
    names = ("input_ids", "attention_mask")
    for name, value in zip(names, args, strict=False):
        if name in kwargs:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        kwargs[name] = value
    if len(args) > len(names):
        raise TypeError("a patched forward takes input_ids and attention_mask positionally; "
                        "pass the other arguments by keyword")
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("the fused loss needs input_ids (inputs_embeds alone give no targets)")
    attention_mask = kwargs.pop("attention_mask", None)
    return input_ids, attention_mask, kwargs


def _fused_forward(self, args, kwargs, fused):
    input_ids, attention_mask, rest = _split_inputs(args, kwargs)
    labels, num_items = rest.get("labels"), rest.get("num_items_in_batch")
    trunk_kwargs = {k: v for k, v in rest.items() if k not in _HEAD_KEYS}
    if fused.get("fused_logprobs"):
        if fused.get("teacher_ids") is not None:
            raise ValueError("pass teacher tensors (CKD loss) or fused_logprobs=True, not both")
        ckd = {**getattr(self, _DEFAULTS, {}), **(fused.get("ckd_kwargs") or {})}
        out = hf.logprobs_from_model(self, input_ids, attention_mask,
                                     temperature=ckd.get("temperature", 1.0),
                                     return_entropy=bool(fused.get("return_entropy")),
                                     backend=ckd.get("backend", "auto"),
                                     trunk_kwargs=trunk_kwargs)
        log_probs, entropy = out if fused.get("return_entropy") else (out, None)
        return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy)
    if fused.get("teacher_logprobs") is None:
        raise ValueError("teacher_ids was given without teacher_logprobs (both are needed)")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
              "loss_mask": fused.get("loss_mask"), "teacher_ids": fused["teacher_ids"],
              "teacher_logprobs": fused["teacher_logprobs"]}
    ckd = {**getattr(self, _DEFAULTS, {}), **(fused.get("ckd_kwargs") or {})}
    loss = hf.ckd_compute_loss(self, {k: v for k, v in inputs.items() if v is not None},
                               num_items_in_batch=num_items, trunk_kwargs=trunk_kwargs, **ckd)
    return FusedCausalLMOutput(loss=loss)


def _make_forward(original_unbound):
    """A forward that dispatches to the fused path when asked, else to ``original_unbound``."""

    # functools.wraps keeps the original signature: `generate` checks its kwargs against it.
    @functools.wraps(original_unbound)
    def forward(self, *args, **kwargs):
        fused = {k: kwargs.pop(k) for k in _FUSED_KEYS if k in kwargs}
        if fused.get("teacher_ids") is None and not fused.get("fused_logprobs"):
            extra = sorted(k for k, v in fused.items() if v is not None and v is not False)
            if extra:
                raise ValueError(f"{extra} given without teacher_ids or fused_logprobs=True")
            return original_unbound(self, *args, **kwargs)
        with hf.inside_model_forward():  # lets the helpers tell FSDP2's forward from outside
            return _fused_forward(self, args, kwargs, fused)

    setattr(forward, _ORIGINAL, original_unbound)
    return forward


def _check_head(model):
    try:
        hf.decoder_and_head(model)
    except ValueError as err:
        raise ValueError(
            f"cannot patch {type(model).__name__}: {err}. The fused ops compute "
            "softmax(W h + b); a soft-capped or scaled head (Gemma2's default "
            "final_logit_softcapping=30) is another distribution, and training on it would "
            "silently change the objective. Set config.final_logit_softcapping=None only if "
            "you mean to train without it.") from None


def is_patched(model) -> bool:
    """Whether ``model``'s forward (instance or class) has been patched here."""
    return hasattr(getattr(model, "forward", None), _ORIGINAL) or hasattr(
        getattr(type(model), "forward", None), _ORIGINAL)


def patch_model(model, **ckd_kwargs):
    """Patch one model instance in place (and return it); ``ckd_kwargs`` are its CKD defaults.

    Patch before wrapping (DDP, FSDP, PEFT, accelerate's ``prepare``): wrappers read
    ``forward`` when they wrap. Raises ``TypeError`` for a model without a ``model``
    trunk and a linear ``lm_head``, and ``ValueError`` for soft-capped or scaled logits.
    """
    _check_head(model)
    if "forward" in vars(model) and hasattr(vars(model)["forward"], _ORIGINAL):
        setattr(model, _DEFAULTS, dict(ckd_kwargs))          # already patched: new defaults
        return model
    model.forward = types.MethodType(_make_forward(type(model).forward), model)
    setattr(model, _DEFAULTS, dict(ckd_kwargs))
    return model


def unpatch_model(model):
    """Undo :func:`patch_model` (a no-op on a model that is not patched)."""
    if "forward" in vars(model) and hasattr(vars(model)["forward"], _ORIGINAL):
        del model.forward
    vars(model).pop(_DEFAULTS, None)
    return model


def _resolve_class(family_or_cls):
    if isinstance(family_or_cls, type):
        return family_or_cls
    import transformers

    if family_or_cls not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} or a model class, "
                         f"got {family_or_cls!r}")
    return getattr(transformers, FAMILIES[family_or_cls])


def patch_class(family_or_cls, **ckd_kwargs):
    """Patch a causal LM class (``"qwen3"`` or ``Qwen3ForCausalLM``), so models built or loaded
    afterwards, or already built, take the fused arguments; returns the class.

    Soft-capping is a config value, so it is checked per call (the fused path raises
    for such a model) rather than here.
    """
    cls = _resolve_class(family_or_cls)
    if not hasattr(cls.forward, _ORIGINAL):
        cls.forward = _make_forward(cls.forward)
    setattr(cls, _DEFAULTS, dict(ckd_kwargs))
    return cls


def unpatch_class(family_or_cls):
    """Undo :func:`patch_class`."""
    cls = _resolve_class(family_or_cls)
    original = getattr(cls.forward, _ORIGINAL, None)
    if original is not None:
        cls.forward = original
    if _DEFAULTS in vars(cls):
        delattr(cls, _DEFAULTS)
    return cls
