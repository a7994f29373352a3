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
To keep calling ``model(**batch)`` (DeepSpeed, FSDP, accelerate wrappers), patch
the forward with :mod:`star_kernels.patching` instead.

Positions: one convention for every helper here
-----------------------------------------------
``input_ids`` is ``[B, T]``.

* Tensors about an **input token** -- ``attention_mask``, ``labels``,
  ``loss_mask``, ``completion_mask`` -- are ``[B, T]``, aligned with
  ``input_ids`` exactly like Hugging Face ``labels``.
* Tensors about a **next-token prediction** -- the teacher's top-k
  (``teacher_ids``, ``teacher_logprobs``), ``old_logprobs``, ``ref_logprobs``,
  per-token ``advantages`` -- are ``[B, T - 1, ...]``: entry ``t`` is the
  distribution after ``input_ids[:, :t + 1]``, the one that predicts
  ``input_ids[:, t + 1]``. That is the layout of ``logits[:, :-1]``, of
  :func:`logprobs_from_model` and of :func:`teacher_topk_from_model`.

A prediction tensor with ``T`` positions is rejected, not guessed at: the
teacher's top-k at every position of its logits (last entry unused) and a
label-aligned tensor (first entry unused) have the same shape, and reading one
as the other shifts every target by a token without any error.

Mixed precision: the fused ops read the ambient ``torch.autocast`` and run their
GEMMs in its dtype (casting inside, so gradients reach fp32 parameters from fp32
accumulators), so a helper called under autocast is mixed precision end to end: the
trunk runs under it too. :class:`CKDTrainerMixin` enters the Trainer's autocast
(``bf16=True`` / ``fp16=True``) itself, because accelerate wraps it around
``model.forward`` only, which these helpers bypass.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from contextlib import nullcontext
from typing import ClassVar

import torch

from .ckd import fused_linear_ckd_loss
from .grpo import fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs
from .topk import fused_linear_topk_logprobs

__all__ = [
    "CKDTrainerMixin",
    "ckd_compute_loss",
    "ckd_loss_from_model",
    "decoder_and_head",
    "gathered",
    "grpo_loss_from_model",
    "hidden_states",
    "logprobs_from_model",
    "teacher_topk_from_model",
]

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
    cache is off. ``hidden[:, t]`` is the state after ``input_ids[:, :t + 1]``:
    position ``t`` predicts token ``t + 1``.
    """
    trunk, head = decoder_and_head(model)
    _check_unsharded(model)
    trunk_kwargs.setdefault("use_cache", False)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, **trunk_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, gathered(head.weight), gathered(head.bias)


# Set while a patched forward (star_kernels.patching) computes the fused loss: under FSDP2
# the root module's hooks have run then (parameters unsharded, gradients reduce-scattered).
_IN_MODEL_FORWARD = contextvars.ContextVar("star_kernels_in_model_forward", default=False)


@contextlib.contextmanager
def inside_model_forward():
    """Marks the fused path of a patched ``forward`` (used by :mod:`star_kernels.patching`)."""
    token = _IN_MODEL_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_MODEL_FORWARD.reset(token)


def _check_unsharded(model):
    """Refuse an FSDP2 root module outside its own forward: its parameters may be sharded
    (the trunk would fail deep inside with "mixed torch.Tensor and DTensor"), or, after a
    forward, unsharded but without FSDP's hooks, so gradients would reach the unsharded
    parameters and never be reduce-scattered across the ranks."""
    if "torch.distributed.fsdp" not in sys.modules or _IN_MODEL_FORWARD.get():
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise RuntimeError(
            f"{type(model).__name__} is FSDP2-sharded (fully_shard): compute the fused loss "
            "inside its forward, where FSDP unshards the parameters and reduces the "
            "gradients, with star_kernels.patching (patch_model(model) before fully_shard, "
            "then model(input_ids, attention_mask, teacher_ids=..., teacher_logprobs=...) or "
            "model(..., fused_logprobs=True))")


def gathered(param: torch.Tensor | None) -> torch.Tensor | None:
    """``param`` as a plain tensor; an FSDP2-sharded parameter (a ``DTensor``) all-gathered.

    Under ``fully_shard`` the helpers work when called inside the root module's forward,
    i.e. through :mod:`star_kernels.patching`'s patched ``model(**batch)``: FSDP2 has
    unsharded the root's parameters there. An ``lm_head`` that is its own ``fully_shard``
    unit stays sharded, since its forward never runs (the fused ops read its weight
    instead): it is gathered here, and in backward its gradient is reduce-scattered back
    to the shards and averaged over the ranks, as FSDP2 does for every other parameter
    (``Partial("avg")``). Other tensors pass through unchanged.
    """
    # A DTensor exists only once torch.distributed.tensor is imported: everyone else skips
    # importing it (and torch builds without torch.distributed never reach it).
    if param is None or "torch.distributed.tensor" not in sys.modules:
        return param
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(param, DTensor):
        return param
    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


def _check_batch(name, t, batch):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2 or t.shape[0] != batch:
        raise ValueError(f"{name} must start with the batch dimension B={batch} of input_ids, "
                         f"got shape {tuple(t.shape)}")


def _per_token(name, t, input_ids):
    """A ``[B, T]`` input-token tensor -> ``[B, T - 1]``: the targets of the predictions."""
    if t is None:
        return None
    batch, seq_len = input_ids.shape
    _check_batch(name, t, batch)
    if t.dim() != 2 or t.shape[1] != seq_len:
        raise ValueError(
            f"{name} must be [B, T] = [{batch}, {seq_len}], aligned with input_ids like Hugging "
            f"Face labels (entry t is about input_ids[:, t]); got shape {tuple(t.shape)}")
    return t[:, 1:]


def _per_prediction(name, t, input_ids, trailing=None):
    """A ``[B, T - 1, ...]`` next-token-prediction tensor, checked; ``[B, T, ...]`` refused."""
    if t is None:
        return None
    batch, seq_len = input_ids.shape
    _check_batch(name, t, batch)
    dims = f"[B, T - 1{', ' + trailing if trailing else ''}]"
    if t.shape[1] == seq_len:
        raise ValueError(
            f"{name} has T={seq_len} positions, as many as input_ids, but it holds next-token "
            f"predictions, which are {dims} with T - 1 = {seq_len - 1}: entry t is the "
            f"distribution that predicts input_ids[:, t + 1]. If it was taken at every position "
            f"of a model's logits or hidden states, drop the last entry ({name}[:, :-1]); if it "
            f"is aligned with labels (entry t about token t), drop the first ({name}[:, 1:]). "
            "teacher_topk_from_model and logprobs_from_model return this layout.")
    if t.shape[1] != seq_len - 1:
        raise ValueError(f"{name} must be {dims} = [{batch}, {seq_len - 1}, ...] (one entry per "
                         f"next-token prediction of input_ids), got shape {tuple(t.shape)}")
    return t


def _target_mask(mask, attention_mask, input_ids, name="loss_mask"):
    """``[B, T - 1]`` bool: predictions whose target counts (``mask`` and not padding)."""
    out = _per_token(name, mask, input_ids)
    out = None if out is None else out != 0
    attn = _per_token("attention_mask", attention_mask, input_ids)
    if attn is not None:
        out = attn != 0 if out is None else out & (attn != 0)
    return out


@torch.no_grad()
def teacher_topk_from_model(teacher, input_ids, attention_mask=None, k=100, *, loss_mask=None,
                            temperature=1.0, sample=False, generator=None, trunk_kwargs=None,
                            backend="auto", memory_budget=None):
    """The teacher's top-k ``(ids, logprobs)``, ``[B, T - 1, k]``, as the student helpers take it.

    Entry ``t`` is the teacher's distribution for ``input_ids[:, t + 1]`` (see
    the module docstring); pass the result as is to :func:`ckd_loss_from_model`
    with the same ``input_ids``. With ``loss_mask`` (``[B, T]``, like labels),
    only the predictions of masked-in, non-padding tokens are computed (the
    teacher's lm_head work shrinks to the response); the others are padding
    (id 0, log-prob ``-inf``) and must be masked out of the student's loss too,
    which the student helpers do when given the same ``loss_mask``. Runs under
    the ambient autocast, like the student helpers. ``sample=True`` draws
    ``k`` weighted samples instead (see
    :func:`star_kernels.fused_linear_topk_logprobs`).
    """
    hidden, weight, bias = hidden_states(teacher, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    hidden = hidden[:, :-1]
    topk = {"temperature": temperature, "bias": bias, "sample": sample, "generator": generator,
            "backend": backend, "memory_budget": memory_budget}
    if loss_mask is None:
        return fused_linear_topk_logprobs(hidden, weight, k, **topk)
    keep = _target_mask(loss_mask, attention_mask, input_ids)
    ids, logps = fused_linear_topk_logprobs(hidden[keep], weight, k, **topk)
    out_ids = ids.new_zeros(keep.shape + (k,))
    out_logps = logps.new_full(keep.shape + (k,), float("-inf"))
    out_ids[keep], out_logps[keep] = ids, logps
    return out_ids, out_logps


def _check_teacher_covers(teacher_logprobs, mask):
    """A counted prediction whose teacher entries are all padding has no target: refuse it."""
    empty = torch.isneginf(teacher_logprobs).all(-1)
    if mask is not None:
        empty = empty & mask
    if empty.any():
        b, t = (int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"teacher_logprobs[{b}, {t}] is all padding (-inf) but that prediction counts in the "
            "loss: mask it out (loss_mask / labels = -100), or compute the teacher's top-k with "
            "the same loss_mask as the student's")


def ckd_loss_from_model(model, input_ids, attention_mask, teacher_ids, teacher_logprobs,
                        loss_mask=None, *, labels=None, trunk_kwargs=None, **ckd_kwargs):
    """:func:`star_kernels.fused_linear_ckd_loss` of a causal LM on ``input_ids``.

    ``teacher_ids`` / ``teacher_logprobs`` are ``[B, T - 1, K]``: entry ``t`` is
    the teacher's distribution for ``input_ids[:, t + 1]``, as
    :func:`teacher_topk_from_model` returns it; ``[B, T, K]`` is refused (see
    the module docstring). ``loss_mask`` and ``labels`` are ``[B, T]`` like
    ``input_ids``. Tokens where ``attention_mask`` is 0 never count. Other
    keyword arguments are the CKD knobs (``tail_coef``, ``student_topm``,
    ``reduction``, ...).
    """
    teacher_ids = _per_prediction("teacher_ids", teacher_ids, input_ids, "K")
    teacher_logprobs = _per_prediction("teacher_logprobs", teacher_logprobs, input_ids, "K")
    mask = _target_mask(loss_mask, attention_mask, input_ids)
    if ckd_kwargs.get("validate", "auto") != "shapes":     # one host sync; "shapes" skips it
        _check_teacher_covers(teacher_logprobs, mask)
    hidden, weight, bias = hidden_states(model, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    return fused_linear_ckd_loss(hidden[:, :-1], weight, teacher_ids, teacher_logprobs,
                                 mask=mask, bias=bias,
                                 labels=_per_token("labels", labels, input_ids), **ckd_kwargs)


def logprobs_from_model(model, input_ids, attention_mask=None, temperature=1.0,
                        return_entropy=False, backend="auto", *, trunk_kwargs=None,
                        memory_budget=None):
    """Log-probs ``[B, T - 1]`` of ``input_ids[:, 1:]`` under the model (and entropies).

    Entry ``t`` is the log-prob of ``input_ids[:, t + 1]``: the layout the
    GRPO helper takes for ``old_logprobs`` / ``ref_logprobs``. Differentiable;
    entries at padding positions are computed but meaningless.
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

    ``completion_mask`` (``[B, T]``, like ``input_ids``) marks the sampled
    tokens; ``old_logprobs`` / ``ref_logprobs`` are ``[B, T - 1]`` as
    :func:`logprobs_from_model` returns them; ``advantages`` is ``[B]`` or
    ``[B, T - 1]``. Returns ``(loss, diagnostics)``.
    """
    mask = _target_mask(completion_mask, attention_mask, input_ids, "completion_mask")
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 2:
        advantages = _per_prediction("advantages", advantages, input_ids)
    old_logprobs = _per_prediction("old_logprobs", old_logprobs, input_ids)
    ref_logprobs = _per_prediction("ref_logprobs", ref_logprobs, input_ids)
    hidden, weight, bias = hidden_states(model, input_ids, attention_mask,
                                         **(trunk_kwargs or {}))
    return fused_linear_grpo_loss(hidden[:, :-1], weight, input_ids[:, 1:], advantages, mask,
                                  old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                  bias=bias, **grpo_kwargs)


def ckd_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, *,
                     trunk_kwargs=None, **ckd_kwargs):
    """A ``Trainer.compute_loss`` body for CKD.

    ``inputs`` holds ``input_ids`` and optionally ``attention_mask``,
    ``loss_mask`` (else ``labels != -100``) and ``labels`` (``[B, T]``, like
    ``input_ids``), and ``teacher_ids`` / ``teacher_logprobs`` (``[B, T - 1, K]``,
    from :func:`teacher_topk_from_model` or a cache in that layout). With
    ``num_items_in_batch`` (the Trainer's token count over gradient-accumulation
    steps) the loss is the sum over tokens divided by it, otherwise the mean
    over valid tokens. Use ``remove_unused_columns=False`` so the Trainer keeps
    the teacher columns. ``trunk_kwargs`` go to the trunk (``position_ids``, ...).
    """
    missing = [k for k in ("input_ids", "teacher_ids", "teacher_logprobs") if k not in inputs]
    if missing:
        raise KeyError(f"the batch lacks {missing} (has {sorted(inputs)}): keep the teacher "
                       "columns (remove_unused_columns=False) or compute them on the fly "
                       "(star_kernels.trl.CKDSFTTrainer(teacher_model=...))")
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
                               labels=labels, trunk_kwargs=trunk_kwargs, **ckd_kwargs)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return (loss, {"loss": loss}) if return_outputs else loss


def trainer_autocast(trainer):
    """The autocast a ``Trainer`` (through its accelerator) puts around ``model.forward``."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.autocast() if accelerator is not None else nullcontext()


class CKDTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to train with the fused CKD loss.

    ``class CKDTrainer(CKDTrainerMixin, Trainer): ckd_kwargs = dict(tail_coef=10.0)``

    The loss runs under the Trainer's mixed precision (``bf16=True`` /
    ``fp16=True``): accelerate puts autocast around ``model.forward``, which
    these helpers do not call, so the mixin enters the same autocast itself.
    """

    ckd_kwargs: ClassVar[dict] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with trainer_autocast(self):
            return ckd_compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch,
                                    **dict(self.ckd_kwargs))
